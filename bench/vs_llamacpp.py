"""expertpager against llama.cpp on llama.cpp's own Q4_K_M GGUF, under memory caps. Run by hand, as root:

    PYTHONPATH=src python bench/vs_llamacpp.py [--tokens 32] [--prompt-len 64[,512,2048]] [--caps none,100,50,33]
        [--llama-dir /work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp] [--gguf FILE] [--timeout 300]

The GGUF is bench/realgeom.py's (made on first use, then reused): Qwen3-30B-A3B layer geometry, 12 layers,
skewed routing, llama.cpp's converter and llama-quantize Q4_K_M, about 4.97 GB. For each prompt length and cap
(none, or a percentage of the file size) it runs, each time after `sync; echo 3 > /proc/sys/vm/drop_caches` and
inside a fresh cgroup-v1 memory cgroup (/sys/fs/cgroup/memory/NAME, memory.limit_in_bytes = the cap; the child
writes its own PID to cgroup.procs before it execs, so everything it does is charged there, page cache included):

  - llama-bench -m FILE -p P -n N -d 0,P -t T -r 1 --no-warmup -o jsonl, once with llama.cpp's defaults (Q4_K
    weights repacked into anonymous memory on this CPU) and once with `--repack 0 -lm mmap` (weights used in place
    from the mmap, so the kernel can evict and re-read them: how it runs under a small cap). llama-bench times the
    prompt (pp) from an empty context and N generated tokens (tg) after P tokens of context (`-d P`, filled
    untimed), as expertpager decodes after its P-token prompt (tg from an empty context is kept in the row's
    extra); no warmup, so prefill runs cold, as expertpager's does.
  - expertpager run MODEL --prompt-ids (P ids) -n N --max-memory CAP --json, with OMP_NUM_THREADS=T, for each of
    --ep-models (LABEL=PATH: the GGUF itself, or stores made from it by `expertpager repack GGUF OUT --compact` or
    `--quantize int4`); without a cap it runs `--resident` instead (every slice read before the prompt, as
    llama.cpp's default loads every weight before it times anything). Decode follows the P-token prompt.

Each run is a row even when it fails: status ok, oom-killed (SIGKILL with the cgroup's oom_kill count up),
killed, timeout (after --timeout seconds; the process group is killed), refused or failed (nonzero exit; the last
stderr line is kept). Reported per run: prefill and decode tok/s, the cgroup's peak charge (memory.max_usage_in_bytes,
page cache included), the child's peak RSS and bytes read from disk (rusage of the reaped child: ru_inblock x 512,
which Linux fills from the task's I/O accounting, i.e. /proc/PID/io read_bytes summed over its threads), major
faults, CPU seconds, memory.failcnt, and "others' CPU s": CPU time the whole machine spent busy during the run
(/proc/stat) less the child's own, i.e. what other processes took, plus kernel work for the run's own I/O
that is not charged to it (softirq, kworkers; large in the thrashing rows) (the machine is shared: in one run here another
process's load cut llama.cpp's decode 7x; rerun rows where it is not near 0). The peak RSS has a floor of this
script's own RSS (about 40 MB), which the child inherits at fork. Per prompt length and cap: expertpager's decode
and prefill tok/s over llama.cpp's best completed run under the same cap. Prints a table, then one JSON line.
drop_caches empties the page cache for every process on the machine, not only the benchmarked one.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realgeom  # noqa: E402

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
REPO_SRC = Path(__file__).resolve().parent.parent / "src"
# The child joins its cgroup and then becomes the program, so the PID we reap is the program's.
JOIN_AND_EXEC = 'echo $$ > "$0" && exec "$@"'
LLAMA_VARIANTS = {"default": [], "no-repack": ["--repack", "0", "-lm", "mmap"]}


@dataclass
class Measured:
    """What one child run left behind: exit, output, resources (rusage of the reaped child) and cgroup counters."""

    exit_code: int | None
    timed_out: bool
    wall_s: float
    stdout: str
    stderr: str
    maxrss_bytes: int
    read_bytes: int
    major_faults: int
    cpu_s: float
    machine_cpu_s: float
    cgroup: dict


@dataclass
class Row:
    """One benchmark run, as reported."""

    program: str
    variant: str
    prompt_len: int
    tokens: int
    cap: str
    cap_bytes: int | None
    flags: str
    status: str = "failed"
    prefill_tps: float | None = None
    decode_tps: float | None = None
    new_tokens: int | None = None
    peak_cgroup_bytes: int | None = None
    maxrss_bytes: int | None = None
    read_bytes: int | None = None
    major_faults: int | None = None
    failcnt: int | None = None
    oom_kills: int | None = None
    wall_s: float | None = None
    cpu_s: float | None = None
    others_cpu_s: float | None = None
    exit_code: int | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def drop_caches() -> None:
    """Write back dirty pages and drop the page cache, dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: everything but idle and iowait)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def make_cgroup(name: str, limit: int | None) -> Path:
    """A fresh memory cgroup (v1) with `limit` bytes (None: no limit; it still counts the peak)."""
    path = CGROUP_ROOT / name
    if path.exists():
        remove_cgroup(path)
    path.mkdir()
    if limit is not None:
        (path / "memory.limit_in_bytes").write_text(str(limit))
    return path


def cgroup_stats(path: Path) -> dict:
    """Peak charge, failcnt and OOM-kill count of a memory cgroup."""
    oom = dict(line.split() for line in (path / "memory.oom_control").read_text().splitlines())
    return {"max_usage_in_bytes": int((path / "memory.max_usage_in_bytes").read_text()),
            "failcnt": int((path / "memory.failcnt").read_text()), "oom_kill": int(oom.get("oom_kill", 0))}


def remove_cgroup(path: Path, tries: int = 50) -> None:
    """rmdir the cgroup once its tasks are gone (its charges move to the parent)."""
    for _ in range(tries):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    print(f"warning: could not remove {path}", file=sys.stderr)


def run_in_cgroup(cmd: list[str], limit: int | None, timeout: float, env: dict | None = None) -> Measured:
    """Drop caches, then run `cmd` in a new session inside a fresh memory cgroup limited to `limit` bytes; kill the
    session after `timeout` seconds. Reaps the child with wait4 to get its rusage."""
    cg = make_cgroup(f"ep-bench-{os.getpid()}", limit)
    drop_caches()
    busy0 = machine_busy_s()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(["sh", "-c", JOIN_AND_EXEC, str(cg / "cgroup.procs"), *cmd], stdout=out, stderr=err,
                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        timed_out, status, ru = False, None, None
        while status is None:
            pid, st, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                status, ru = st, usage
            elif time.perf_counter() - t0 > timeout:
                timed_out = True
                os.killpg(p.pid, signal.SIGKILL)
                _, status, ru = os.wait4(p.pid, 0)
            else:
                time.sleep(0.1)
        wall = time.perf_counter() - t0
        busy = machine_busy_s() - busy0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    stats = cgroup_stats(cg)
    remove_cgroup(cg)
    return Measured(p.returncode, timed_out, wall, stdout, stderr, ru.ru_maxrss * 1024, ru.ru_inblock * 512,
                    ru.ru_majflt, ru.ru_utime + ru.ru_stime, busy, stats)


def classify(m: Measured) -> str:
    """ok, timeout, oom-killed, killed or failed."""
    if m.timed_out:
        return "timeout"
    if m.exit_code == 0:
        return "ok"
    if m.exit_code in (-signal.SIGKILL, 137):
        return "oom-killed" if m.cgroup["oom_kill"] else "killed"
    return "failed"


def last_line(text: str, width: int = 400) -> str:
    """The last non-empty line of `text`, shortened to `width` characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return re.sub(r"^error: \S+\.gguf: ", "error: ", lines[-1])[:width] if lines else ""


def llama_bench_cmd(bench: Path, gguf: Path, prompt_len: int, tokens: int, threads: int, variant: str) -> list[str]:
    """llama-bench: prompt and generation tests at depths 0 and `prompt_len` (`-d`: that many tokens in the context
    first, untimed), one repetition each, no warmup, JSON lines out."""
    return [str(bench), "-m", str(gguf), "-p", str(prompt_len), "-n", str(tokens), "-d", f"0,{prompt_len}",
            "-t", str(threads), "-r", "1", "--no-warmup", "-o", "jsonl", *LLAMA_VARIANTS[variant]]


def parse_llama_bench(stdout: str, depth: int) -> tuple[float | None, float | None, float | None]:
    """(prompt tok/s from an empty context, generation tok/s after `depth` tokens of context, generation tok/s from
    an empty context) from llama-bench -o jsonl; None for a test that did not finish. expertpager decodes after
    its prompt, so the second is the one to compare with."""
    pp = tg = tg0 = None
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        at = r.get("n_depth", 0)
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 and at == 0:
            pp = r["avg_ts"]
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0 and at == depth:
            tg = r["avg_ts"]
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            tg0 = r["avg_ts"]
    return pp, tg, tg0


def prompt_ids(n: int, vocab: int = 6000) -> str:
    """n fixed token ids inside the demo tokenizer's real vocabulary (ids above 6143 are padding)."""
    return ",".join(str(100 + (i * 7919) % (vocab - 100)) for i in range(n))


def expertpager_cmd(model: Path, prompt_len: int, tokens: int, max_memory: str | None) -> list[str]:
    """expertpager run on `model` with a fixed prompt of `prompt_len` ids, under `max_memory` or fully resident
    (None); one JSON object out."""
    memory = ["--resident"] if max_memory is None else ["--max-memory", max_memory]
    return [sys.executable, "-m", "expertpager", "run", str(model), "--prompt-ids", prompt_ids(prompt_len),
            "-n", str(tokens), *memory, "--json"]


def parse_expertpager(stdout: str) -> dict | None:
    """The stats of expertpager's --json output, or None when it printed none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line).get("stats", {})
    return None


def cap_bytes(cap: str, file_bytes: int) -> int | None:
    """A cap given as 'none' or a percentage of the file size, in bytes."""
    return None if cap == "none" else int(file_bytes * float(cap.rstrip("%")) / 100)


def fill(row: Row, m: Measured) -> None:
    """Copy what every run reports from `m` into `row`."""
    row.status = classify(m)
    row.peak_cgroup_bytes = m.cgroup["max_usage_in_bytes"]
    row.failcnt, row.oom_kills = m.cgroup["failcnt"], m.cgroup["oom_kill"]
    row.maxrss_bytes, row.read_bytes, row.major_faults = m.maxrss_bytes, m.read_bytes, m.major_faults
    row.wall_s, row.cpu_s, row.exit_code = round(m.wall_s, 1), round(m.cpu_s, 1), m.exit_code
    row.others_cpu_s = round(max(0.0, m.machine_cpu_s - m.cpu_s), 1)
    if row.status != "ok":
        row.note = last_line(m.stderr)


def run_llama(bench: Path, gguf: Path, variant: str, prompt_len: int, tokens: int, threads: int, cap: str,
              limit: int | None, timeout: float) -> Row:
    """One llama-bench run under a cap."""
    cmd = llama_bench_cmd(bench, gguf, prompt_len, tokens, threads, variant)
    row = Row("llama.cpp", variant, prompt_len, tokens, cap, limit,
              " ".join(["-t", str(threads), "-r", "1", "--no-warmup", *LLAMA_VARIANTS[variant]]))
    m = run_in_cgroup(cmd, limit, timeout)
    fill(row, m)
    row.prefill_tps, row.decode_tps, from_empty = parse_llama_bench(m.stdout, prompt_len)
    row.extra = {"decode_tps_empty_context": from_empty}
    row.new_tokens = tokens if row.decode_tps is not None else None
    return row


def run_expertpager(label: str, model: Path, prompt_len: int, tokens: int, threads: int, cap: str, limit: int | None,
                    timeout: float, src: Path) -> Row:
    """One expertpager run under a cap (its --max-memory is the cap; fully resident when there is none)."""
    max_memory = None if limit is None else str(limit)
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    memory = "--resident" if max_memory is None else f"--max-memory {max_memory}"
    row = Row("expertpager", label, prompt_len, tokens, cap, limit, f"{model.name} {memory} OMP_NUM_THREADS={threads}")
    m = run_in_cgroup(expertpager_cmd(model, prompt_len, tokens, max_memory), limit, timeout, env)
    fill(row, m)
    stats = parse_expertpager(m.stdout)
    if stats is not None:
        row.prefill_tps, row.decode_tps = stats.get("prefill_tokens_per_s"), stats.get("decode_tokens_per_s")
        row.new_tokens = stats.get("new_tokens")
        row.extra = {k: stats[k] for k in ("hit_rate", "prefetch_hit_rate", "bytes_read", "peak_rss_bytes",
                                            "cache_bytes", "cache_slots", "resident_bytes", "stall_seconds")
                     if k in stats}
        row.note = ep_note(row.extra, row.new_tokens, tokens) if row.status == "ok" else row.note
    elif row.status == "failed" and "is too small" in m.stderr:
        row.status = "refused"
    return row


def ep_note(stats: dict, new_tokens: int | None, tokens: int) -> str:
    """expertpager's own counters for the table: hit rate, expert bytes it read, cache size, early stop."""
    note = (f"hit rate {stats.get('hit_rate', 0):.0%}, expert reads {stats.get('bytes_read', 0) / 1e9:.2f} GB, "
            f"cache {stats.get('cache_bytes', 0) / 1e9:.2f} GB")
    return note + (f"; stopped after {new_tokens} tokens" if new_tokens is not None and new_tokens < tokens else "")


def ratios(rows: list[Row]) -> list[dict]:
    """Per (prompt length, cap) and expertpager model: its tok/s over the best completed llama.cpp run under the
    same cap."""
    out = []
    for key in dict.fromkeys((r.prompt_len, r.cap) for r in rows):
        here = [r for r in rows if (r.prompt_len, r.cap) == key]
        llama = [r for r in here if r.program == "llama.cpp" and r.decode_tps]
        best = max(llama, key=lambda r: r.decode_tps, default=None)
        for ep in [r for r in here if r.program == "expertpager"] or [None]:
            item = {"prompt_len": key[0], "cap": key[1], "llama_best": best.variant if best else None,
                    "llama_decode_tps": best.decode_tps if best else None, "model": ep.variant if ep else None,
                    "expertpager": ep.status if ep else None, "expertpager_decode_tps": ep.decode_tps if ep else None,
                    "decode_ratio": None, "prefill_ratio": None}
            if best and ep and ep.decode_tps:
                item["decode_ratio"] = round(ep.decode_tps / best.decode_tps, 3)
                if ep.prefill_tps and best.prefill_tps:
                    item["prefill_ratio"] = round(ep.prefill_tps / best.prefill_tps, 3)
            out.append(item)
    return out


def fmt(v: float | int | None, scale: float = 1.0, digits: int = 2) -> str:
    """A number for the table, '-' for None."""
    return "-" if v is None else f"{v / scale:.{digits}f}"


def print_table(rows: list[Row], ratio_rows: list[dict]) -> None:
    """Markdown tables: one row per run, then the ratios."""
    print("| prompt | cap | program | model | flags | status | prefill tok/s | decode tok/s | cgroup peak GB | peak RSS GB "
          "| read GB | major faults | wall s | CPU s | others' CPU s | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cap = r.cap if r.cap_bytes is None else f"{r.cap} ({r.cap_bytes / 1e9:.2f} GB)"
        print(f"| {r.prompt_len} | {cap} | {r.program} | {r.variant} | `{r.flags}` | {r.status} | {fmt(r.prefill_tps)} "
              f"| {fmt(r.decode_tps)} | {fmt(r.peak_cgroup_bytes, 1e9)} | {fmt(r.maxrss_bytes, 1e9)} "
              f"| {fmt(r.read_bytes, 1e9)} | {fmt(r.major_faults, 1, 0)} | {fmt(r.wall_s, 1, 0)} | {fmt(r.cpu_s, 1, 0)} "
              f"| {fmt(r.others_cpu_s, 1, 0)} | {r.note[:160]} |")
    print()
    print("| prompt | cap | llama.cpp best (decode tok/s) | expertpager model | status (decode tok/s) "
          "| decode ratio ep/llama | prefill ratio |")
    print("|---|---|---|---|---|---|---|")
    for x in ratio_rows:
        print(f"| {x['prompt_len']} | {x['cap']} | {x['llama_best'] or '-'} ({fmt(x['llama_decode_tps'])}) "
              f"| {x['model'] or '-'} | {x['expertpager'] or '-'} ({fmt(x['expertpager_decode_tps'])}) | {fmt(x['decode_ratio'], digits=3)} "
              f"| {fmt(x['prefill_ratio'], digits=3)} |")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-dir", type=Path, default=realgeom.DEFAULT_LLAMA_DIR,
                    help="llama.cpp tree with build/bin/llama-bench (and, to make the GGUF, llama-quantize)")
    ap.add_argument("--gguf", type=Path, help="use this GGUF instead of realgeom's")
    ap.add_argument("--ep-models", default="",
                    help="what expertpager runs, LABEL=PATH comma-separated (default: gguf=the GGUF), e.g. "
                         "compact=OUT of `expertpager repack GGUF OUT --compact`, int4=OUT of `... --quantize int4`")
    ap.add_argument("--out-dir", type=Path, default=realgeom.DEFAULT_OUT_DIR, help="where realgeom's GGUF lives")
    ap.add_argument("--layers", type=int, default=12, help="realgeom layers")
    ap.add_argument("--skew", type=float, default=0.5, help="realgeom router skew")
    ap.add_argument("--tokens", "-n", type=int, default=32, help="tokens to decode")
    ap.add_argument("--prompt-len", default="64", help="prompt lengths, comma-separated (e.g. 64,512,2048)")
    ap.add_argument("--caps", default="none,100,50,33", help="'none' and/or percentages of the file size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--programs", default="llama.cpp,expertpager", help="which programs to run")
    ap.add_argument("--llama-variants", default="default,no-repack", help=f"of {', '.join(LLAMA_VARIANTS)}")
    ap.add_argument("--ep-src", type=Path, default=REPO_SRC,
                    help="expertpager source put first on PYTHONPATH for its runs (default: this checkout's src)")
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    if os.geteuid() != 0 or not CGROUP_ROOT.is_dir():
        sys.exit(f"needs root and cgroup v1 memory at {CGROUP_ROOT} (drop_caches, cgroup limits)")
    programs = a.programs.split(",")
    bench = realgeom.llama_tool(a.llama_dir, "llama-bench") if "llama.cpp" in programs else None
    gguf = a.gguf or realgeom.make_gguf(a.out_dir, a.llama_dir, realgeom.Geometry(layers=a.layers), a.skew)
    size = gguf.stat().st_size
    variants = a.llama_variants.split(",")
    print(f"GGUF {gguf} ({size / 1e9:.2f} GB); llama-bench {bench}; expertpager from {a.ep_src}", file=sys.stderr)
    models = dict(item.split("=", 1) for item in a.ep_models.split(",") if item) or {"gguf": str(gguf)}
    rows: list[Row] = []
    for prompt_len in (int(p) for p in a.prompt_len.split(",")):
        for cap in (c if c == "none" else c.rstrip("%") + "%" for c in a.caps.split(",")):
            limit = cap_bytes(cap, size)
            if "llama.cpp" in programs:
                for v in variants:
                    rows.append(run_llama(bench, gguf, v, prompt_len, a.tokens, a.threads, cap, limit, a.timeout))
                    print(f"  {json.dumps(asdict(rows[-1]))}", file=sys.stderr, flush=True)
            if "expertpager" in programs:
                for label, model in models.items():
                    rows.append(run_expertpager(label, Path(model), prompt_len, a.tokens, a.threads, cap, limit,
                                                a.timeout, a.ep_src))
                    print(f"  {json.dumps(asdict(rows[-1]))}", file=sys.stderr, flush=True)
    ratio_rows = ratios(rows)
    print_table(rows, ratio_rows)
    print(json.dumps({"bench": "vs_llamacpp", "gguf": str(gguf), "file_bytes": size, "threads": a.threads,
                      "tokens": a.tokens, "llama_bench": str(bench), "rows": [asdict(r) for r in rows],
                      "ratios": ratio_rows}))


if __name__ == "__main__":
    main()
