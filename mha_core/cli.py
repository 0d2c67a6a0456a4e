"""``mha-core``: convert checkpoints to our format and describe them."""

from __future__ import annotations

import argparse
import sys

from mha_core.checkpoint import CheckpointError, read_checkpoint, save_checkpoint


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", type=int, help="decoder layer to take from a seed GPT checkpoint")
    p.add_argument("--num-heads", type=int, help="number of heads (required for nn.MultiheadAttention files)")
    p.add_argument("--max-seq-len", type=int, help="longest sequence (for files that do not record it)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mha-core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="write any supported checkpoint in mha-serve's safetensors format")
    conv.add_argument("src")
    conv.add_argument("dst")
    _add_source_args(conv)
    info = sub.add_parser("info", help="print a checkpoint's config and content checksum")
    info.add_argument("file")
    _add_source_args(info)
    args = parser.parse_args(argv)

    src = args.src if args.command == "convert" else args.file
    try:
        loaded = read_checkpoint(src, layer=args.layer, num_heads=args.num_heads, max_seq_len=args.max_seq_len)
    except CheckpointError as e:
        print(f"mha-core: error: {e}", file=sys.stderr)
        return 2
    if args.command == "convert":
        save_checkpoint(loaded.module, args.dst)
        print(f"wrote {args.dst} ({loaded.format} -> mha-serve), {loaded.checksum}")
        return 0
    print(f"format: {loaded.format}")
    for k, v in loaded.module.config.to_dict().items():
        print(f"{k}: {str(v).lower() if isinstance(v, bool) else v}")
    print(f"dtype: {str(loaded.module.qkv.weight.dtype).removeprefix('torch.')}")
    print(f"checksum: {loaded.checksum}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
