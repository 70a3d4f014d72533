"""Backbone speed and memory: images/s at 224x224 and peak memory, batch 1 and 8, and the overhead
of vad's TimmBackbone over a bare timm forward of the very same module.

    python benchmarks/backbones.py                      # CPU (or --device cuda), prints a Markdown table
    python benchmarks/backbones.py --repeats 9 --variants channels-last bf16   # + those rows
    python benchmarks/backbones.py --threads 1              # on a machine shared with other jobs

Weights are random (speed does not depend on them), so this runs offline. Each model runs in
its own subprocess so that peak memory is its own: on CUDA the allocator's peak
(``max_memory_allocated``) during the forward passes; on CPU the process's peak RSS above its
RSS just before the first forward (activations and workspace; the weights are not included).

Timing: each repeat times ``iters`` forward passes (chosen so a repeat lasts ~0.25 s), the
bare and wrapped forwards alternate within every repeat so that load from other processes hits
both alike, and the table gives medians over repeats. "wrapper" requests every feature map,
exactly what the bare forward returns; "PatchCore layers" requests the stride-8 and stride-16
maps only, where the wrapper stops the network early when timm's wrapper allows it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODELS = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "resnet18", "wide_resnet50_2"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(model_name: str, batch_sizes: list[int], repeats: int, device: str, size: int, variants: list[str], threads: int) -> list[dict]:
    """Measurements of one model (runs inside the worker subprocess)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from vad.features import default_layers
    from vad_timm.backbone import TimmBackbone

    torch.manual_seed(0)
    configs = [("float32", {})]
    if "channels-last" in variants:
        configs.append(("channels-last", {"channels_last": True}))
    if "bf16" in variants:
        configs.append(("channels-last+bf16", {"channels_last": True, "autocast": True}))
    rows = []
    for label, options in configs:
        backbone = TimmBackbone(model_name, pretrained=False, **options).to(device)
        every_layer = [f.name for f in backbone.feature_info()]
        patchcore_layers = default_layers(backbone)
        model = backbone.model

        def sync() -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        def bare(x):
            with torch.inference_mode(), backbone._autocast():
                x = x.contiguous(memory_format=torch.channels_last) if backbone.channels_last else x
                return model(x)

        def wrapped(x):
            return backbone.forward_features(x, every_layer)

        def patchcore(x):
            return backbone.forward_features(x, patchcore_layers)

        for batch in batch_sizes:
            x = torch.randn(batch, 3, size, size, device=device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
            else:
                base_rss = _rss_mib()
            sync()
            started = time.perf_counter()
            bare(x)  # warm-up (allocator, kernels, caches), timed to size the repeats
            sync()
            single = time.perf_counter() - started
            iters = max(1, min(50, round(0.25 / max(single, 1e-4))))
            times = {"bare": [], "wrapper": [], "patchcore": []}
            for _ in range(repeats):
                for key, fn in (("bare", bare), ("wrapper", wrapped), ("patchcore", patchcore)):
                    sync()
                    started = time.perf_counter()
                    for _ in range(iters):
                        fn(x)
                    sync()
                    times[key].append((time.perf_counter() - started) / iters)
            if device.startswith("cuda"):
                peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
            else:
                peak = max(0.0, _peak_rss_mib() - base_rss)
            median = {key: statistics.median(values) for key, values in times.items()}
            # The wrapper's own cost, free of load noise: forward_features with the network's
            # result precomputed (layer resolution, device/dtype handling, the output dict).
            outputs = backbone._run(x.contiguous(memory_format=torch.channels_last) if backbone.channels_last else x,
                                    set(range(len(every_layer))))
            backbone._run = lambda images, wanted: {i: outputs[i] for i in wanted}
            started = time.perf_counter()
            for _ in range(200):
                backbone.forward_features(x, every_layer)
            fixed = (time.perf_counter() - started) / 200
            del backbone._run
            rows.append({
                "model": model_name, "variant": label, "batch": batch,
                "bare_ips": batch / median["bare"], "wrapper_ips": batch / median["wrapper"],
                "patchcore_ips": batch / median["patchcore"],
                "overhead_pct": 100.0 * (median["wrapper"] / median["bare"] - 1.0),
                "fixed_us": fixed * 1e6, "fixed_pct": 100.0 * fixed / median["bare"],
                "peak_mib": peak, "iters": iters, "layers": "+".join(patchcore_layers),
            })
        del backbone, model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default); on a shared machine use 1, "
                        "since OpenMP threads competing with other processes slow down by an order of magnitude")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--variants", nargs="*", default=[], choices=["channels-last", "bf16"],
                        help="also time channels-last, and channels-last + bfloat16 autocast (bf16 is very slow on CPUs without bf16 units)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rows = measure(args.worker, args.batch_sizes, args.repeats, args.device, args.size, args.variants, args.threads)
        print("RESULT " + json.dumps(rows))
        return

    import torch  # only to resolve the device and describe the machine

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    threads = args.threads or torch.get_num_threads()
    machine = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), {threads} thread(s)"
    started = time.perf_counter()
    rows = []
    for model_name in args.models:
        command = [sys.executable, __file__, "--worker", model_name, "--device", device, "--size", str(args.size),
                   "--repeats", str(args.repeats), "--threads", str(args.threads), "--batch-sizes", *map(str, args.batch_sizes)]
        command += ["--variants", *args.variants] if args.variants else []
        done = subprocess.run(command, capture_output=True, text=True)
        results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not results:
            print(f"{model_name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows += json.loads(results[-1][len("RESULT "):])
    memory = "CUDA peak allocated during forward" if device.startswith("cuda") else "peak RSS above pre-forward RSS"
    print(f"\nBackbones at {args.size}x{args.size}, random weights, {machine}; torch {torch.__version__}; "
          f"medians of {args.repeats} repeats; memory = {memory}.\n")
    print("| model | variant | batch | bare timm img/s | vad wrapper img/s | overhead, side by side | wrapper's own cost | PatchCore layers img/s | peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['bare_ips']:.1f} | {r['wrapper_ips']:.1f} | "
              f"{r['overhead_pct']:+.1f}% | {r['fixed_us']:.0f} µs ({r['fixed_pct']:.2f}%) | "
              f"{r['patchcore_ips']:.1f} ({r['layers']}) | {r['peak_mib']:.0f} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
