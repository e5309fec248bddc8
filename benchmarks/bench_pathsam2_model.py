"""Path-SAM2 forward and training-step throughput (tiles/s) for the paper's and the small CPU configuration.

- ``paper``: SAM2 Hiera-B+ and UNI ViT-L/16 (frozen), decoder 256-d, 1024 px tiles: the
  configuration of the GlaS/CRAG/EBHI recipes (random weights: speed does not depend on them).
- ``small``: the bundled CPU model's configuration (Hiera micro, no UNI, 256 px).

Each line: median of ``--repeats`` timed calls after one warm-up; ``train`` is forward +
backward + AdamW step of the trainable parameters. On CUDA, ``--amp`` runs under bf16 autocast.

    .venv/bin/python benchmarks/bench_pathsam2_model.py --config small            # CPU
    python3 benchmarks/bench_pathsam2_model.py --config paper --device cuda --amp   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

CONFIGS = {
    "paper": dict(encoder="sam2_hiera_base_plus", uni="uni", image_size=1024),
    "small": dict(
        encoder="hiera_micro",
        uni=None,
        image_size=256,
        decoder_dim=128,
        decoder_heads=4,
        decoder_mlp_dim=512,
        freeze_encoders=False,
    ),
}


def main(argv=None) -> None:
    import torch

    from napari_pathfm.models.registry import create_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="tiles per call (default 2 paper, 8 small)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model("pathsam2", num_classes=2, **CONFIGS[args.config]).to(dev)
    B = args.batch or (2 if args.config == "paper" else 8)
    S = model.input_size
    x = torch.randn(B, 3, S, S, device=dev)
    y = torch.randint(0, 2, (B, S, S), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if args.amp else contextlib.nullcontext()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    from napari_pathfm.models.pathsam2.loss import pathsam2_loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def infer():
        with torch.inference_mode(), amp:
            model.eval()(x)

    def train():
        model.train()
        with amp:
            loss, _ = pathsam2_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(
        f"# Path-SAM2 {args.config}: {n_all / 1e6:.1f} M parameters ({n_train / 1e6:.1f} M trainable), "
        f"{S} px tiles, batch {B}, {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'bf16 autocast' if args.amp else 'fp32'}"
    )
    for label, fn in (("inference", infer), ("train step", train)):
        times = []
        for i in range(args.repeats + 1):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"{label:11s} {t * 1000:9.1f} ms per batch   {B / t:8.2f} tiles/s")
    if dev.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
