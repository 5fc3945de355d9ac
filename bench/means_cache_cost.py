"""What the block-means design costs per call (issue 16), on this machine's CPU.

Training (the layer in train mode, or keys in autograd) recomputes ``kbar``/``bbar`` on every
call: one read of the keys table. Decoding (eval mode, no autograd) serves them from the
layer's ``BlockMeansCache`` after a host-side validity check. This prints, for the acceptance
shape and the decode shape, the median time of: recomputing the means, a cache hit, the
whole layer call (forward; forward+backward when training), and the recompute's share.

    python bench/means_cache_cost.py [--reps 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sfnn
from sfnn.cache import fresh_block_means

SHAPES = {  # name: (T, d_model, d_ff, block_size, top_k)
    "acceptance": (4096, 512, 8192, 64, 16),
    "decode": (1, 4096, 16384, 64, 32),
}


def median_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(name: str, reps: int) -> list[str]:
    T, d_model, d_ff, g, k = SHAPES[name]
    torch.manual_seed(0)
    ffn = sfnn.SparseFFN(d_model, d_ff, block_size=g, top_k=k, activation="gelu")
    x = torch.randn(T, d_model)
    keys, kb = ffn.key_weight, ffn.key_bias
    rows = []
    with torch.no_grad():
        recompute = median_ms(lambda: fresh_block_means(keys, kb, g, "torch"), reps)
        cache = sfnn.BlockMeansCache()
        cache._lookup(keys, kb, g, "torch")
        hit = median_ms(lambda: cache._lookup(keys, kb, g, "torch"), max(reps, 200)) * 1e3
        ffn.eval()
        eval_fwd = median_ms(lambda: ffn(x), reps)
        ffn.train()
        train_nograd_fwd = median_ms(lambda: ffn(x), reps)
    rows.append(f"{name}: T={T} d_model={d_model} d_ff={d_ff} g={g} top_k={k} fp32, "
                f"keys {keys.numel() * 4 / 1e6:.1f} MB")
    rows.append(f"  recompute kbar+bbar (one read of keys): {recompute:.3f} ms")
    rows.append(f"  cache hit (validity check + lookup):    {hit:.2f} us")
    rows.append(f"  eval-mode forward (cache hit):          {eval_fwd:.3f} ms")
    rows.append(f"  train-mode forward under no_grad:       {train_nograd_fwd:.3f} ms "
                f"(recompute = {100 * recompute / train_nograd_fwd:.1f}% of it)")
    def step():
        ffn(x).sum().backward()
    fwd_bwd = median_ms(step, reps)
    ffn.zero_grad(set_to_none=True)
    train_fwd = median_ms(lambda: ffn(x), reps)
    rows.append(f"  training forward (recomputes):          {train_fwd:.3f} ms "
                f"(recompute = {100 * recompute / train_fwd:.1f}%)")
    rows.append(f"  training forward+backward:              {fwd_bwd:.3f} ms "
                f"(recompute = {100 * recompute / fwd_bwd:.1f}%)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"torch {torch.__version__}, {args.threads} threads, load average {' '.join(load)}")
    for name in args.shapes:
        print("\n".join(measure(name, args.reps)))


if __name__ == "__main__":
    main()
