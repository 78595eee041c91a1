"""Speed, peak memory and accuracy of the empirical-NTK engine.

    python benchmarks/kernel_speed.py            # N=256 (MLP, CNN), N=500 (ResNet-18-sized)
    python benchmarks/kernel_speed.py --quick    # N=64 / N=32, no dense projections: about a minute
    python benchmarks/kernel_speed.py --models mlp,cnn
    python benchmarks/kernel_speed.py --quick --models cnn --n 256   # the CNN at N=256, no dense projections
    python benchmarks/kernel_speed.py --optimizers --models mlp,cnn  # estimate_kernel for SGD vs AdamW

Every measurement runs in a fresh process so that its peak memory (max RSS above the
process's baseline after building the model and data) is its own. With ``--repeats R`` every
variant is measured R times, the variants taking turns (so that a load change on a shared
machine hits all of them), and the table shows the median seconds. Errors are relative
Frobenius errors against the torch.func tutorial method (vmap(jacrev) + einsum), or, for the
ResNet-18-sized model where that does not fit, against our exact path on a subset.
Prints a table per model and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_ttp.kernel import empirical_ntk  # noqa: E402
from lightning_ttp.pipeline.estimate import estimate_kernel  # noqa: E402

OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-3),
}


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


class TutorialCNN(nn.Module):
    """The CNN of PyTorch's "Neural Tangent Kernels" tutorial: 3× conv3x3 (32 channels) + fc → 10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, (3, 3))
        self.conv2 = nn.Conv2d(32, 32, (3, 3))
        self.conv3 = nn.Conv2d(32, 32, (3, 3))
        self.fc = nn.Linear(21632, 10)

    def forward(self, x):
        x = self.conv1(x).relu()
        x = self.conv2(x).relu()
        x = self.conv3(x)
        return self.fc(x.flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(h)) + self.shortcut(x)).relu()


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (11.2M parameters) on 32×32 images."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


MODELS = {
    "mlp": (mlp, (1, 28, 28), 10),
    "cnn": (TutorialCNN, (3, 32, 32), 10),
    "resnet18": (ResNet18, (3, 32, 32), 5),
}


def build(name: str, n: int):
    torch.manual_seed(0)
    make, shape, _ = MODELS[name]
    model = make()
    x = torch.randn(n, *shape)
    model.train()
    with torch.no_grad():  # realistic BatchNorm running statistics
        for _ in range(3):
            model(x[:64])
    model.eval()
    return model, x


def torch_func_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tutorial method: per-sample Jacobians by vmap(jacrev), then einsum per parameter."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def single(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(single), (None, 0))(params, x)
    blocks = [torch.einsum("Naf,Mbf->NaMb", j.flatten(2), j.flatten(2)) for j in jac.values()]
    n, c = x.shape[0], blocks[0].shape[1]
    return sum(blocks).reshape(n * c, n * c)


def forward_backward(model: nn.Module, x: torch.Tensor, backwards: int) -> torch.Tensor:
    params = [p for p in model.parameters()]
    out = model(x)
    for k in range(backwards):
        torch.autograd.grad(out[:, k].sum(), params, retain_graph=k < backwards - 1)
    return out


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(name: str, n: int, method: str, options: dict, save: str | None, queue, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    model, x = build(name, n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = _cpu_seconds()
    start = time.perf_counter()
    result: dict = {}
    gram = None
    if method == "torch.func":
        gram = torch_func_ntk(model, x)
    elif method == "fwd+bwd":
        forward_backward(model, x, options["backwards"])
    elif method == "estimate":
        warnings.simplefilter("ignore")  # the AdamW approximation warning, once per process
        optimizer = OPTIMIZERS[options["optimizer"]](model.parameters())
        y = torch.randint(0, MODELS[name][2], (n,), generator=torch.Generator().manual_seed(0))
        ke = estimate_kernel(model, x, y, optimizer=optimizer, kernel="full", batch_statistics=False)
        result["kernel_seconds"] = ke.info["kernel_seconds"]
    else:
        ntk = empirical_ntk(model, x, **options)
        gram = ntk.gram
        result["contraction"] = ntk.timings["contraction"]
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = _cpu_seconds() - cpu
    result["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    if gram is not None and save:
        torch.save(gram, save)
    queue.put(result)


def measure(name: str, n: int, method: str, options: dict | None = None, save: str | None = None) -> dict:
    """Run one measurement in a fresh process (its own peak memory); ``save`` keeps the Gram for errors."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(name, n, method, options or {}, save, queue, THREADS))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def rel_error(path: str, reference: str) -> float:
    a, b = torch.load(path).double(), torch.load(reference).double()
    return ((a - b).norm() / b.norm()).item()


RESNET_BUDGET = 2 * 2**30
THREADS = 2  # torch threads per measurement (--threads)


def trace_approximation_error(trace_path: str, full_path: str, c: int) -> float:
    """‖Θ − Θ_trace/C ⊗ I_C‖ / ‖Θ‖: what kernel="trace" assumes away."""
    trace, full = torch.load(trace_path).double(), torch.load(full_path).double()
    approx = torch.kron(trace / c, torch.eye(c, dtype=torch.float64))
    return ((full - approx).norm() / full.norm()).item()


def run_model(
    name: str, n: int, projection_dim: int, with_reference: bool, workdir: Path, dense_projections: bool = True,
    repeats: int = 1,
) -> list[dict]:
    c = MODELS[name][2]
    rows = []
    ref_path = str(workdir / f"{name}-ref.pt")
    variants = []
    if with_reference:
        variants.append(("torch.func (vmap(jacrev)+einsum)", "torch.func", {}))
        variants.append(("ours exact", "ours", {}))
        variants.append(("ours trace (N x N)", "ours", {"kernel": "trace"}))
    for projection in ("sparse", "gaussian", "kronecker"):
        if projection != "kronecker" and (name == "resnet18" or not dense_projections):
            continue  # a dense D x D' projection costs D' backward passes: what kronecker avoids
        options = {"projection_dim": projection_dim, "projection": projection}
        if name == "resnet18":
            options["memory_budget"] = RESNET_BUDGET
        variants.append((f"ours {projection} D'={projection_dim}", "ours", options))
    variants += [(f"1 forward + {b} backward", "fwd+bwd", {"backwards": b}) for b in (1, c)]
    results: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    for _ in range(repeats):
        for index, (label, method, options) in enumerate(variants):
            save = ref_path if method == "torch.func" else str(workdir / f"{name}-{index}.pt")
            results[label].append(measure(name, n, method, options, save=save if method != "fwd+bwd" else None))
    for index, (label, method, options) in enumerate(variants):
        runs = results[label]
        result = dict(runs[0])
        for key in ("seconds", "cpu_seconds", "peak_mib", "contraction"):
            if key in result:
                result[key] = statistics.median(r[key] for r in runs)
        result["all_seconds"] = [r["seconds"] for r in runs]
        result["all_cpu_seconds"] = [r["cpu_seconds"] for r in runs]
        result["label"] = label
        save = str(workdir / f"{name}-{index}.pt")
        if with_reference and method == "ours" and options.get("kernel") != "trace":
            result["rel_error"] = rel_error(save, ref_path)
        if options.get("kernel") == "trace":
            result["trace_approximation_error"] = trace_approximation_error(save, ref_path, c)
        rows.append(result)
    return rows


def run_optimizers(name: str, n: int, repeats: int) -> dict:
    """estimate_kernel (exact, full Gram) for SGD+momentum and AdamW: seconds and peak memory, the
    preconditioned Adam kernel against the plain one."""
    rows = {label: [] for label in OPTIMIZERS}
    for _ in range(repeats):
        for label in OPTIMIZERS:
            rows[label].append(measure(name, n, "estimate", {"optimizer": label}))
    out = {}
    print(f"\n{name}: estimate_kernel, N={n}, C={MODELS[name][2]} (median of {repeats})")
    print(f"{'optimizer':<10} {'seconds':>9} {'kernel s':>9} {'peak MiB':>9}")
    for label, runs in rows.items():
        out[label] = {key: statistics.median(r[key] for r in runs) for key in ("seconds", "kernel_seconds", "peak_mib")}
        out[label]["all_seconds"] = [r["seconds"] for r in runs]
        print(f"{label:<10} {out[label]['seconds']:>9.2f} {out[label]['kernel_seconds']:>9.2f} "
              f"{out[label]['peak_mib']:>9.0f}")
    ratio = out["AdamW"]["seconds"] / out["SGD"]["seconds"]
    memory = out["AdamW"]["peak_mib"] / max(out["SGD"]["peak_mib"], 1.0)
    print(f"AdamW / SGD: {ratio:.2f}x the time, {memory:.2f}x the peak memory")
    return {"n": n, "adamw_over_sgd_seconds": ratio, "adamw_over_sgd_peak_mib": memory, "rows": out}


def projection_error_on_subset(n: int, projection_dim: int, workdir: Path) -> float:
    """Kronecker-projected vs our exact Gram for the ResNet-18-sized model on ``n`` samples."""
    exact = str(workdir / "resnet-exact.pt")
    proj = str(workdir / "resnet-proj.pt")
    measure("resnet18", n, "ours", {}, save=exact)
    options = {"projection_dim": projection_dim, "projection": "kronecker", "memory_budget": RESNET_BUDGET}
    measure("resnet18", n, "ours", options, save=proj)
    return rel_error(proj, exact)


def print_table(name: str, n: int, rows: list[dict]) -> None:
    params = sum(p.numel() for p in MODELS[name][0]().parameters())
    print(f"\n{name}: {params / 1e6:.2f}M parameters, N={n}, C={MODELS[name][2]}")
    print(f"{'method':<40} {'seconds':>9} {'CPU s':>9} {'peak MiB':>9} {'rel. error':>11}")
    for row in rows:
        err = f"{row['rel_error']:.1e}" if "rel_error" in row else "-"
        print(f"{row['label']:<40} {row['seconds']:>9.2f} {row['cpu_seconds']:>9.2f} {row['peak_mib']:>9.0f} {err:>11}")


def report(summary: dict) -> None:
    """Print the JSON summary and keep it in benchmarks/results/<benchmark>.json."""
    text = json.dumps(summary)
    print(text)
    Path("benchmarks/results", f"{summary['benchmark']}.json").write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=64 / 32, no dense projections: about a minute")
    parser.add_argument("--models", default="mlp,cnn,resnet18", help="comma-separated subset of mlp,cnn,resnet18")
    parser.add_argument("--n", type=int, default=None, help="samples for the MLP and the CNN (default 64 / 256)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per variant (median reported)")
    parser.add_argument("--optimizers", action="store_true", help="estimate_kernel for SGD vs AdamW instead")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per measurement")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    models = args.models.split(",")
    n_small, n_resnet, subset = (64, 32, 8) if args.quick else (256, 500, 48)
    n_small = args.n or n_small
    workdir = Path("benchmarks/results/kernel")
    workdir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"quick": args.quick, "repeats": args.repeats, "threads": args.threads}
    if args.optimizers:
        for name in [m for m in ("mlp", "cnn") if m in models]:
            summary[name] = run_optimizers(name, n_small, args.repeats)
        report({"benchmark": "kernel_speed_optimizers", **summary})
        return
    for name in [m for m in ("mlp", "cnn") if m in models]:
        rows = run_model(name, n_small, 1024, True, workdir, dense_projections=not args.quick, repeats=args.repeats)
        print_table(name, n_small, rows)
        by = {r["label"]: r for r in rows}
        ref, ours = by["torch.func (vmap(jacrev)+einsum)"], by["ours exact"]
        passes = by[f"1 forward + {MODELS[name][2]} backward"]["seconds"]
        limit = passes + ours["contraction"]
        trace = by["ours trace (N x N)"]
        summary[name] = {
            "n": n_small,
            "trace_seconds": trace["seconds"],
            "trace_approximation_error": trace["trace_approximation_error"],
            "speedup_vs_torch_func": ref["seconds"] / ours["seconds"],
            "speedups_per_repeat": [a / b for a, b in zip(ref["all_seconds"], ours["all_seconds"])],
            "cpu_speedup_vs_torch_func": ref["cpu_seconds"] / ours["cpu_seconds"],
            "exact_over_forward_and_c_backward": ours["seconds"] / passes,
            "exact_rel_error": ours["rel_error"],
            "exact_over_physical_limit": ours["seconds"] / limit,
            "rows": rows,
        }
        print(
            f"exact: {summary[name]['speedup_vs_torch_func']:.1f}x faster than torch.func (median of {args.repeats}; "
            f"per repeat {', '.join(f'{r:.1f}' for r in summary[name]['speedups_per_repeat'])}), "
            f"in CPU time {summary[name]['cpu_speedup_vs_torch_func']:.1f}x, "
            f"{summary[name]['exact_over_forward_and_c_backward']:.2f}x 1 forward + C backward, "
            f"{summary[name]['exact_over_physical_limit']:.2f}x the physical limit "
            f"(1 fwd + C bwd + contraction = {limit:.2f} s); kernel='trace' assumes Θ ≈ Θ_trace/C ⊗ I, "
            f"relative error {trace['trace_approximation_error']:.2f}"
        )
    if "resnet18" not in models:
        report({"benchmark": "kernel_speed", **summary})
        return
    rows = run_model("resnet18", n_resnet, 1024, False, workdir)
    print_table("resnet18", n_resnet, rows)
    error = projection_error_on_subset(subset, 1024, workdir)
    print(f"resnet18 kronecker D'=1024 vs our exact on N={subset}: relative error {error:.3f}")
    print(f"memory budget given to the projected ResNet runs: {RESNET_BUDGET / 2**30:.0f} GiB")
    kron = next(r for r in rows if "kronecker" in r["label"])
    summary["resnet18"] = {
        "n": n_resnet,
        "kronecker_seconds": kron["seconds"],
        "kronecker_peak_mib": kron["peak_mib"],
        "kronecker_rel_error_on_subset": error,
        "subset": subset,
        "rows": rows,
    }
    report({"benchmark": "kernel_speed", **summary})


if __name__ == "__main__":
    main()
