"""The GPU check, one command: correctness on the device, then timings and peak memory.

1. Correctness: the device-parametrised tests (every option of the test grid
   on the dense, engine and tiles paths, every reduction, against a float64
   CPU reference; the autocast policy; a queue module), run by pytest on
   ``--device``.
2. Timings: forward+backward of our loss on each backend (``ours``:
   ``INFO_NCE_BACKEND=auto``, the Triton kernels where they exist;
   ``ours_torch``: the PyTorch ops), the dense loss (where it fits) and the
   matrix-product floor (the products of forward+backward alone: three of
   (B, N, D) each), timed with device events in the same process, and each
   one's peak ``torch.cuda.max_memory_allocated`` above its inputs, for

   * in-batch InfoNCE, B = N = 32768, D = 512;
   * the symmetric loss, B = 32768, D = 512;
   * ``nt_xent`` over V = 2 views of B = 16384, D = 512 (2B rows against 2B);
   * shared hard negatives, B = 16384, M = 3, D = 512 (N = 65536);
   * SigLIP's sigmoid loss, B = 32768, D = 512;

   each in bfloat16 under autocast (bfloat16 embeddings, as an autocast
   encoder returns them) and in float32 with TF32 products.

3. Peers, where they are installed in the check's environment (never by the
   project): Inf-CL's ``cal_inf_loss``, Liger-Kernel's fused linear
   cross-entropy and Cut Cross-Entropy's ``linear_cross_entropy`` (each with
   the keys as the classifier: the one-direction loss), and open_clip's
   ``ClipLoss`` and ``SigLipLoss``, timed as ours; "-" where a peer is
   missing or has no such loss.
4. A ``torch.profiler`` split of our step: the share of its device time (CPU
   time off CUDA) spent in matrix products.

It prints markdown tables and writes ``--json``. Run from the repository
root on a machine with a GPU (after ``make setup``), estimated at about 5
minutes on one H100 or H200, not measured (its budget is 8):

    .venv/bin/python benchmarks/gpu.py --device cuda --json gpu.json

``--small`` runs the same on tiny sizes (what the test suite does on the CPU,
to keep the script working without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor

from info_nce import info_nce, nt_xent, siglip_loss
from info_nce._backend import ENVIRONMENT

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    batch: int  # B: rows of each input
    dim: int
    kind: str  # "in-batch", "symmetric", "nt_xent", "shared" or "siglip"


CASES = (
    Case("in-batch B=N=32768 D=512", 32768, 512, "in-batch"),
    Case("symmetric B=32768 D=512", 32768, 512, "symmetric"),
    Case("nt_xent V=2 B=16384 D=512", 16384, 512, "nt_xent"),
    Case("shared B=16384 M=3 D=512", 16384, 512, "shared"),
    Case("siglip B=32768 D=512", 32768, 512, "siglip"),
)
SMALL_CASES = (
    Case("in-batch B=N=96 D=16", 96, 16, "in-batch"),
    Case("symmetric B=96 D=16", 96, 16, "symmetric"),
    Case("nt_xent V=2 B=48 D=16", 48, 16, "nt_xent"),
    Case("shared B=48 M=3 D=16", 48, 16, "shared"),
    Case("siglip B=96 D=16", 96, 16, "siglip"),
)
NEGATIVES = 3  # M, the shared case's hard negatives per row
BIAS = -10.0  # the sigmoid loss's logit bias
PRECISIONS = ("bf16-autocast", "fp32-tf32")
TEMPERATURE = 0.1


def negatives(case: Case, b: Tensor) -> Tensor:
    """The shared case's (B, M, D) hard negatives: fixed functions of the keys."""
    return torch.stack([b.roll(m + 1, dims=1) for m in range(NEGATIVES)], dim=1)


def ours(case: Case, a: Tensor, b: Tensor) -> Tensor:
    if case.kind == "nt_xent":
        return nt_xent([a, b], temperature=TEMPERATURE)
    if case.kind == "shared":
        return info_nce(a, b, negatives(case, b), temperature=TEMPERATURE, negative_mode="shared")
    if case.kind == "siglip":
        return siglip_loss(a, b, TEMPERATURE, BIAS)
    return info_nce(a, b, temperature=TEMPERATURE, symmetric=case.kind == "symmetric")


def dense(case: Case, a: Tensor, b: Tensor) -> Tensor:
    """The plain-PyTorch formula with the logits matrix (what a user writes)."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    if case.kind == "nt_xent":
        z = torch.cat([a, b])  # (2B, D)
        logits = (z @ z.T).float() / TEMPERATURE  # (2B, 2B)
        logits.fill_diagonal_(float("-inf"))
        n = len(a)
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(a.device)
        return F.cross_entropy(logits, targets)
    if case.kind == "siglip":
        logits = (a @ b.T).float() / TEMPERATURE + BIAS  # (B, B)
        signs = 2 * torch.eye(len(a), device=a.device) - 1
        return -F.logsigmoid(signs * logits).sum() / len(a)
    keys = b
    if case.kind == "shared":
        keys = torch.cat([b, F.normalize(negatives(case, b).flatten(0, 1), dim=1)])
    logits = (a @ keys.T).float() / TEMPERATURE  # (B, N)
    targets = torch.arange(len(a), device=a.device)
    loss = F.cross_entropy(logits, targets)
    if case.kind == "symmetric":
        loss = (loss + F.cross_entropy(logits.T, targets)) / 2
    return loss


def floor(case: Case, a: Tensor, b: Tensor) -> Tensor:
    """Forward+backward's matrix products alone: logits, then d rows and d keys."""
    rows = torch.cat([a, b]) if case.kind == "nt_xent" else a
    keys = rows if case.kind == "nt_xent" else b
    if case.kind == "shared":
        keys = torch.cat([b, negatives(case, b).flatten(0, 1)])  # (B + B * M, D)
    logits = rows @ keys.T  # (R, N)
    return (logits @ keys).sum() + (logits.T @ rows).sum()


def _one_direction(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The in-batch loss as a classifier's: (B, D) inputs, the (B, D) keys as classes, targets."""
    inputs = F.normalize(a, dim=1) / TEMPERATURE
    return inputs, F.normalize(b, dim=1), torch.arange(len(a), device=a.device)


def peers() -> dict[str, Callable[[Case, Tensor, Tensor], Tensor | None]]:
    """Each installed peer's loss for a case (None: it has none for that case)."""
    found: dict[str, Callable[[Case, Tensor, Tensor], Tensor | None]] = {}
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        pass
    else:

        def inf_cl(case: Case, a: Tensor, b: Tensor) -> Tensor | None:
            scale = torch.tensor(1 / TEMPERATURE, device=a.device)
            q, k = F.normalize(a, dim=1), F.normalize(b, dim=1)
            if case.kind == "in-batch":
                return cal_inf_loss(q, k, scale=scale)
            if case.kind == "symmetric":
                return (cal_inf_loss(q, k, scale=scale) + cal_inf_loss(k, q, scale=scale)) / 2
            return None

        found["inf_cl"] = inf_cl
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        pass
    else:
        liger_loss = LigerFusedLinearCrossEntropyLoss()

        def liger(case: Case, a: Tensor, b: Tensor) -> Tensor | None:
            if case.kind != "in-batch":
                return None
            inputs, classes, targets = _one_direction(a, b)
            return liger_loss(classes, inputs, targets)

        found["liger"] = liger
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        pass
    else:

        def cce(case: Case, a: Tensor, b: Tensor) -> Tensor | None:
            if case.kind != "in-batch":
                return None
            return linear_cross_entropy(*_one_direction(a, b))

        found["cce"] = cce
    try:
        from open_clip.loss import ClipLoss, SigLipLoss
    except ImportError:
        pass
    else:

        def open_clip(case: Case, a: Tensor, b: Tensor) -> Tensor | None:
            q, k = F.normalize(a, dim=1), F.normalize(b, dim=1)
            scale = torch.tensor(1 / TEMPERATURE, device=a.device)
            if case.kind == "symmetric":
                return ClipLoss()(q, k, scale)
            if case.kind == "siglip":
                return SigLipLoss()(q, k, scale, torch.tensor(BIAS, device=a.device))
            return None

        found["open_clip"] = open_clip
    return found


# Device kernels of matrix products, by name (cuBLAS, CUTLASS; aten's on the CPU).
PRODUCT_NAMES = (
    "gemm",
    "cutlass",
    "xmma",
    "sm90_",
    "sm80_",
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
)


def product_share(step: Callable[[], None], device: torch.device) -> float | None:
    """The share of one step's device time (CPU time off CUDA) spent in matrix products."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    try:
        step()  # warm
        with profile(activities=[activity]) as profiler:
            step()
            if cuda:
                torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        return None
    products = total = 0.0
    for event in profiler.key_averages():
        spent = event.self_device_time_total if cuda else event.self_cpu_time_total
        total += spent
        if any(name in event.key.lower() for name in PRODUCT_NAMES):
            products += spent
    return products / total if total else None


def timed(
    step: Callable[[], None], device: torch.device, repeats: int
) -> tuple[float, float] | None:
    """Median seconds of ``step`` and its peak memory (MiB) above what was allocated before."""
    cuda = device.type == "cuda"
    try:
        step()  # warm-up (and the kernels' autotuning)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) if cuda else 0
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20 if cuda else 0.0
    except torch.OutOfMemoryError:
        return None
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return statistics.median(times), peak


def run_case(case: Case, precision: str, device: torch.device, repeats: int) -> dict[str, object]:
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16-autocast" else torch.float32
    a = torch.randn(case.batch, case.dim, device=device, generator=generator, dtype=dtype)
    b = torch.randn(case.batch, case.dim, device=device, generator=generator, dtype=dtype)
    a.requires_grad_()
    b.requires_grad_()
    autocast = precision == "bf16-autocast"

    def step_of(
        loss_fn: Callable[[Case, Tensor, Tensor], Tensor], backend: str | None = None
    ) -> Callable[[], None]:
        """One forward+backward; with ``backend``, both under that ``INFO_NCE_BACKEND``."""
        environment = {} if backend is None else {ENVIRONMENT: backend}

        def step() -> None:
            a.grad = b.grad = None
            with mock.patch.dict(os.environ, environment):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = loss_fn(case, a, b)
                loss.backward()

        return step

    row: dict[str, object] = {"case": case.name, "precision": precision}
    losses = (
        ("ours", ours, None),
        ("ours_torch", ours, "torch"),  # the PyTorch ops, forward and backward
        ("dense", dense, None),
        ("floor", floor, None),
    )
    for label, loss_fn, backend in losses:
        result = timed(step_of(loss_fn, backend), device, repeats)
        row[f"{label}_s"] = None if result is None else result[0]
        row[f"{label}_mib"] = None if result is None else result[1]
    row["ours_product_share"] = product_share(step_of(ours), device)
    for name, peer in peers().items():
        with torch.no_grad():
            applies = peer(case, a[:2].detach(), b[:2].detach()) is not None
        result = timed(step_of(peer), device, repeats) if applies else None  # type: ignore[arg-type]
        row[f"peer_{name}_s"] = None if result is None else result[0]
        row[f"peer_{name}_mib"] = None if result is None else result[1]
        row[f"peer_{name}_applies"] = applies
    return row


def correctness(device: torch.device) -> int:
    """The device-parametrised tests on ``device`` (pytest's exit status)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", device.type]
    command += ["tests/test_device.py", "tests/test_autocast.py", "tests/test_triton.py"]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO, check=False).returncode


def ratio(numerator: object, denominator: object) -> str:
    if not isinstance(numerator, float) or not isinstance(denominator, float):
        return "-"
    return f"{numerator / denominator:.2f}x"


def number(value: object, unit: str) -> str:
    return "OOM" if value is None else f"{value:.3f} {unit}" if unit == "s" else f"{value:.0f}"


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| case | precision | ours | ours (torch ops) | dense | floor | ours / floor "
        "| torch ops / floor | dense / ours | ours MiB | dense MiB | floor MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['precision']} | {number(row['ours_s'], 's')} "
            f"| {number(row['ours_torch_s'], 's')} "
            f"| {number(row['dense_s'], 's')} | {number(row['floor_s'], 's')} "
            f"| {ratio(row['ours_s'], row['floor_s'])} "
            f"| {ratio(row['ours_torch_s'], row['floor_s'])} "
            f"| {ratio(row['dense_s'], row['ours_s'])} "
            f"| {number(row['ours_mib'], 'MiB')} | {number(row['dense_mib'], 'MiB')} "
            f"| {number(row['floor_mib'], 'MiB')} |"
        )
    return "\n".join(lines)


def peer_table(rows: list[dict[str, object]]) -> str:
    """Our step's product share, and each installed peer's time and memory against ours."""
    names = sorted(
        {key[5:-2] for row in rows for key in row if key.startswith("peer_") and key.endswith("_s")}
    )
    header = "| case | precision | ours: products' share |"
    header += "".join(f" {n} | {n} / ours | {n} MiB |" for n in names)
    lines = [header, "|---|---|---|" + "---|---|---|" * len(names)]
    for row in rows:
        share = row.get("ours_product_share")
        line = f"| {row['case']} | {row['precision']} | "
        line += "-" if not isinstance(share, float) else f"{100 * share:.0f}%"
        line += " |"
        for n in names:
            if not row.get(f"peer_{n}_applies"):
                line += " - | - | - |"
                continue
            seconds = row.get(f"peer_{n}_s")
            line += f" {number(seconds, 's')} | {ratio(seconds, row['ours_s'])} "
            line += f"| {number(row.get(f'peer_{n}_mib'), 'MiB')} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device to check (default: cuda)")
    parser.add_argument("--small", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--skip-tests", action="store_true", help="timings only")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available on this machine")
        print(torch.cuda.get_device_name(device), "torch", torch.__version__, flush=True)
    status = 0 if args.skip_tests else correctness(device)
    torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 rows' products: TF32
    rows = []
    for case in SMALL_CASES if args.small else CASES:
        for precision in PRECISIONS:
            rows.append(run_case(case, precision, device, args.repeats))
            print(f"  {case.name} {precision}: done", flush=True)
    print(table(rows))
    print()
    print(peer_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
