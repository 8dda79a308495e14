"""Reconstruction error of NF4 vs FP4 vs int4 on Gaussian weights.

Writes experiments/results/quant_error.json and quant_error.png and prints a
table. Usage: ``python -m experiments.quant_error [--size 4096] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from experiments import RESULTS

CONFIGS = [
    ("nf4", dict(kind="nf4", block_size=64, double_quant=True)),
    ("nf4 (no DQ)", dict(kind="nf4", block_size=64, double_quant=False)),
    ("fp4", dict(kind="fp4", block_size=64, double_quant=True)),
    ("int4 g128", dict(kind="int4", group_size=128)),
    ("int4 g64", dict(kind="int4", group_size=64)),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS), help="output directory")
    args = ap.parse_args(argv)
    n = args.size
    w = jax.random.normal(jax.random.key(args.seed), (n, n), jnp.float32) * jnp.float32(0.02)
    params = {"layer": {"kernel": w}}
    wn = np.asarray(w, np.float64)
    rms = float(np.sqrt(np.mean(wn ** 2)))
    rows = []
    for name, cfg in CONFIGS:
        kind = cfg.pop("kind")
        t0 = time.perf_counter()
        q = lj.quantize(params, kind, **cfg)
        jax.block_until_ready(q)
        tq = time.perf_counter() - t0
        d = np.asarray(jax.jit(lambda t: t["layer"]["kernel"].materialize())(q), np.float64)
        err = d - wn
        rows.append({
            "config": name, "kind": kind, **cfg,
            "rel_rmse": float(np.sqrt(np.mean(err ** 2)) / rms),
            "max_abs_err": float(np.max(np.abs(err))),
            "max_abs_err_over_std": float(np.max(np.abs(err)) / rms),
            "bits_per_param": lj.bits_per_param(q)["bits_per_param"],
            "quantize_seconds": tq,
        })
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"weights": f"N(0, 0.02^2), {n}x{n} float32", "seed": args.seed,
              "backend": jax.default_backend(), "jax": jax.__version__, "results": rows}
    (out / "quant_error.json").write_text(json.dumps(result, indent=2))

    print(f"{'config':<14}{'bits/param':>11}{'rel RMSE':>10}{'max|err|/std':>14}{'quant s':>9}")
    for r in rows:
        print(f"{r['config']:<14}{r['bits_per_param']:>11.4f}{r['rel_rmse']:>10.4f}"
              f"{r['max_abs_err_over_std']:>14.3f}{r['quantize_seconds']:>9.2f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    names = [r["config"] for r in rows]
    ax[0].bar(names, [r["rel_rmse"] for r in rows], color="tab:blue")
    ax[0].set_ylabel("relative RMSE")
    ax[1].bar(names, [r["max_abs_err_over_std"] for r in rows], color="tab:orange")
    ax[1].set_ylabel("max |error| / std")
    for a in ax:
        a.tick_params(axis="x", rotation=30)
    fig.suptitle(f"4-bit reconstruction error, Gaussian {n}x{n}")
    fig.tight_layout()
    fig.savefig(out / "quant_error.png", dpi=120)
    return result


if __name__ == "__main__":
    main()
