#!/usr/bin/env python3
"""Writes a small LoRA adapter GGUF for a llama-architecture base model (by default Tollgate's
SmolLM2-135M-Instruct) with a visible, deterministic effect on its output.

The adapter is not trained: it is a fixed-seed random rank-R update of a few layers' attention
output and feed-forward down projections, sized relative to each base weight's RMS so that
greedy output clearly changes at scale 1 (and is untouched at scale 0). It exists to exercise
LoRA heads end to end (tests, demos) without shipping binary files.

    .venv/bin/python scripts/make-lora.py --out models/adapters/demo.gguf
    cargo loco task ...   # or: POST /attach-head {"name": "demo", "path": "demo.gguf"}

Needs the `gguf` and `numpy` packages (tests/python/requirements.txt).
"""
import argparse
import sys

import numpy as np

import gguf


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="models/SmolLM2-135M-Instruct.Q4_1.gguf", help="base model GGUF")
    p.add_argument("--out", required=True, help="adapter file to write (.gguf)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234, help="same seed, same adapter (byte for byte)")
    p.add_argument("--layers", default="2,6,10,14", help="comma-separated block indices")
    p.add_argument("--targets", default="attn_output,ffn_down", help="comma-separated weight names")
    p.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="RMS of the update relative to the base weight's RMS (at adapter scale 1)",
    )
    p.add_argument("--name", default="tollgate-demo-lora")
    return p.parse_args()


def field_str(reader: gguf.GGUFReader, key: str) -> str:
    field = reader.fields.get(key)
    if field is None:
        raise SystemExit(f"{key} missing from the base model")
    return str(field.contents())


def weight_rms(tensor) -> float:
    """RMS of a (possibly quantized) base weight."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
    return float(np.sqrt(np.mean(values * values)))


def main() -> int:
    args = parse_args()
    reader = gguf.GGUFReader(args.base)
    if field_str(reader, "general.type") not in ("model", ""):
        raise SystemExit(f"{args.base} is not a base model")
    arch = field_str(reader, "general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    targets = [x.strip() for x in args.targets.split(",") if x.strip()]

    rng = np.random.default_rng(args.seed)
    writer = gguf.GGUFWriter(args.out, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(args.name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # alpha = rank makes llama.cpp's effective scale exactly the requested adapter scale.
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(args.rank))

    count = 0
    for layer in layers:
        for target in targets:
            name = f"blk.{layer}.{target}.weight"
            base = tensors.get(name)
            if base is None:
                raise SystemExit(f"{name} not in {args.base}")
            # GGUF shapes are listed innermost first: ne0 = input features, ne1 = output features.
            n_in, n_out = int(base.shape[0]), int(base.shape[1])
            rms = weight_rms(base)
            # entries of B @ A have standard deviation sqrt(rank) * std(A) * std(B).
            a = rng.standard_normal((args.rank, n_in)).astype(np.float32)
            b = rng.standard_normal((n_out, args.rank)).astype(np.float32)
            b *= np.float32(args.strength * rms / np.sqrt(args.rank))
            # numpy shapes are outermost first: lora_a is ne = [n_in, rank], lora_b [rank, n_out].
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)
            count += 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {args.out}: {count} LoRA pairs, rank {args.rank}, arch {arch}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
