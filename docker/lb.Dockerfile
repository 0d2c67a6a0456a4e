# nginx for docker/compose.yaml on machines with no registry: any Debian/Ubuntu base will do
# (docker/ci.sh builds it on its local Debian image). Elsewhere compose uses the official
# nginx image instead, with the same docker/nginx.conf.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN export DEBIAN_FRONTEND=noninteractive \
 && apt-get update \
 && apt-get install -y --no-install-recommends nginx \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
 && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 8080
# SIGQUIT: nginx's graceful stop (finish in-flight requests), as in the official image
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
