#!/usr/bin/env python3
"""Mutation check of the loom models: do they catch the bugs they exist for?

Each mutation in `mutations.toml` (next to this script) names a file of the
workspace, a piece of text that must occur in it exactly once, its
replacement, and the model expected to catch it. For each mutation the
script applies it, builds the model, runs it, and restores the file (also
on an error, Ctrl-C or SIGTERM; a run killed outright is repaired at the
next start from the journal in `target/mutations/`). With `--scratch` it
works instead in a separate git worktree of the committed HEAD
(`target/mutations/worktree`), so the working tree is never touched and can
be edited meanwhile. A mutation is

* caught    if the build succeeds and the model (or the suite) fails,
* survived  if the model passes,
* invalid   if the mutated workspace does not build (or the text to find
            is missing or ambiguous): that says nothing about the models.

Before the mutations, the models to run are checked unmutated (a model
that fails anyway would "catch" everything); `--no-baseline` skips that.

    python3 loom-tests/mutations.py                  # every mutation, its own model
    python3 loom-tests/mutations.py --suite          # every mutation, whole loom suite
    python3 loom-tests/mutations.py --only gen-relaxed-store dirty-word-swap
    python3 loom-tests/mutations.py --list           # the list, without running
    python3 loom-tests/mutations.py --equivalent     # also run the equivalent mutants
    python3 loom-tests/mutations.py --scratch        # mutate a worktree of HEAD, not this tree

Models run as CI runs them: `LOOM_MAX_PREEMPTIONS=2`, `RUSTFLAGS="--cfg
topos_loom"`, release, `--target-dir target/loom` (so builds are shared with
the CI command). Exit status: 0 if every mutation run was caught.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_LIST = HERE / "mutations.toml"


def workspace_root() -> Path:
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


ROOT = workspace_root()
STATE = ROOT / "target" / "mutations"
JOURNAL = STATE / "journal.json"
# Where mutations are applied and cargo runs: ROOT, or a scratch worktree.
TREE = ROOT


# ----- the list -----------------------------------------------------------------

REQUIRED = ("id", "file", "find", "replace", "description", "model")


def load_list(path: Path):
    data = tomllib.loads(path.read_text())
    defaults = data.get("defaults", {})
    muts, equivalent = [], []
    for kind, out in (("mutation", muts), ("equivalent", equivalent)):
        for m in data.get(kind, []):
            missing = [k for k in REQUIRED if k not in m]
            if missing:
                sys.exit(f"{path}: {kind} {m.get('id', '?')} lacks {', '.join(missing)}")
            out.append({**defaults, **m, "kind": kind})
    ids = [m["id"] for m in muts + equivalent]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        sys.exit(f"{path}: duplicate ids {sorted(dup)}")
    return muts, equivalent


# ----- commands -----------------------------------------------------------------


def split_model(model: str):
    """`file` or `file::test_name` -> (test target, filter or None)."""
    target, _, name = model.partition("::")
    return target, (name or None)


def cargo_env(m):
    env = dict(os.environ)
    if m.get("loom", True):
        flags = env.get("RUSTFLAGS", "")
        if "--cfg topos_loom" not in flags:
            flags = (flags + " --cfg topos_loom").strip()
        env["RUSTFLAGS"] = flags
        env.setdefault("LOOM_MAX_PREEMPTIONS", "2")
    return env


def commands(m, suite: bool):
    """(build command, run command) for a mutation, as argument lists or shell strings."""
    if "run" in m:  # explicit commands (any crate, any harness)
        return m.get("build"), m["run"]
    pkg = m.get("package", "topos-loom-tests")
    base = ["cargo", "test", "-p", pkg]
    if m.get("loom", True):
        base += ["--release", "--target-dir", str(ROOT / "target" / "loom")]
    else:
        base += ["--target-dir", str(ROOT / "target")]
    if suite:
        return base + ["--no-run"], base
    target, name = split_model(m["model"])
    sel = ["--test", target]
    run = base + sel
    if name:
        run += ["--", name]
    return base + sel + ["--no-run"], run


def run(cmd, env, timeout, log):
    """Runs a command; returns "ok", "fail" or "timeout"."""
    shell = isinstance(cmd, str)
    with open(log, "a") as f:
        f.write(f"\n$ {cmd if shell else ' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=TREE, env=env, shell=shell, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return "timeout"
        except BaseException:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
    return "ok" if rc == 0 else "fail"


# ----- applying and restoring ---------------------------------------------------


def restore_from_journal():
    if not JOURNAL.exists():
        return
    j = json.loads(JOURNAL.read_text())
    Path(j["path"]).write_text(j["original"])
    JOURNAL.unlink()
    print(f"restored {j['path']} (left mutated by an interrupted run)", file=sys.stderr)


class Applied:
    """Applies one mutation for the duration of a `with` block."""

    def __init__(self, m):
        self.m = m
        self.path = TREE / m["file"]

    def check(self):
        """None if the mutation applies, else why not."""
        if not self.path.exists():
            return f"no file {self.m['file']}"
        n = self.path.read_text().count(self.m["find"])
        if n != 1:
            return f"text to find occurs {n} times in {self.m['file']}"
        return None

    def __enter__(self):
        self.original = self.path.read_text()
        STATE.mkdir(parents=True, exist_ok=True)
        JOURNAL.write_text(json.dumps({"path": str(self.path), "original": self.original}))
        self.path.write_text(self.original.replace(self.m["find"], self.m["replace"], 1))
        return self

    def __exit__(self, *exc):
        self.path.write_text(self.original)
        JOURNAL.unlink(missing_ok=True)
        return False


def scratch_worktree() -> Path:
    """A worktree of HEAD under target/mutations, created or reset."""
    wt = STATE / "worktree"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    if not (wt / ".git").exists():
        STATE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), head], cwd=ROOT, check=True, capture_output=True)
    else:
        subprocess.run(["git", "checkout", "--detach", "--force", head], cwd=wt, check=True, capture_output=True)
        subprocess.run(["git", "clean", "-fdq"], cwd=wt, check=True)
    print(f"scratch worktree at {head[:12]}: {wt} (remove with `git worktree remove {wt}`)")
    return wt


def interrupted(*_):
    raise KeyboardInterrupt


# ----- main ---------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list-file", type=Path, default=DEFAULT_LIST, help="the mutation list (TOML)")
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutations")
    ap.add_argument("--suite", action="store_true", help="run the whole loom suite for each mutation")
    ap.add_argument("--equivalent", action="store_true", help="also run the mutants listed as equivalent")
    ap.add_argument("--list", action="store_true", help="print the list and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the models")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model run (a hang counts as caught)")
    ap.add_argument("--scratch", action="store_true", help="apply the mutations in a worktree of HEAD, not in this tree")
    args = ap.parse_args()

    global TREE
    signal.signal(signal.SIGTERM, interrupted)
    restore_from_journal()
    muts, equivalent = load_list(args.list_file)
    chosen = muts + (equivalent if args.equivalent or args.only else [])
    if args.only:
        unknown = set(args.only) - {m["id"] for m in chosen}
        if unknown:
            sys.exit(f"unknown mutation ids: {sorted(unknown)}")
        chosen = [m for m in chosen if m["id"] in args.only]

    if args.list:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        for m in muts + equivalent:
            tag = "  [equivalent]" if m["kind"] == "equivalent" else ""
            print(f"{m['id']}  ->  {m['model']}{tag}\n    {m['file']}: {m['description']}")
        return 0

    if args.scratch:
        TREE = scratch_worktree()

    STATE.mkdir(parents=True, exist_ok=True)
    log = STATE / "log.txt"
    log.write_text("")
    print(f"log: {log}")

    if not args.no_baseline:
        seen = set()
        for m in chosen:
            build, cmd = commands(m, args.suite)
            key = json.dumps(cmd)
            if key in seen:
                continue
            seen.add(key)
            env = cargo_env(m)
            if (build and run(build, env, None, log) != "ok") or run(cmd, env, args.timeout, log) != "ok":
                sys.exit(f"baseline: `{cmd if isinstance(cmd, str) else ' '.join(cmd)}` fails without any mutation (see {log})")
        print(f"baseline: {len(seen)} model run(s) pass unmutated")

    results = []
    for m in chosen:
        applied = Applied(m)
        t0 = time.monotonic()
        why = applied.check()
        if why:
            result = f"invalid ({why})"
        else:
            build, cmd = commands(m, args.suite)
            env = cargo_env(m)
            with applied:
                if build and run(build, env, None, log) != "ok":
                    result = "invalid (does not build)"
                else:
                    r = run(cmd, env, args.timeout, log)
                    result = {"fail": "caught", "timeout": "caught (timeout)", "ok": "survived"}[r]
        secs = time.monotonic() - t0
        results.append((m, result, secs))
        print(f"{m['id']:<34} {result:<24} {secs:6.0f}s  {m['model']}", flush=True)

    print()
    wid = max(len(m["id"]) for m, _, _ in results) if results else 2
    print(f"| {'id':<{wid}} | result | model | description |")
    print(f"|{'-' * (wid + 2)}|--------|-------|-------------|")
    for m, result, _ in results:
        tag = " *(equivalent mutant)*" if m["kind"] == "equivalent" else ""
        print(f"| {m['id']:<{wid}} | {result} | {m['model']} | {m['description']}{tag} |")
    listed = [r for r in results if r[0]["kind"] == "mutation"]
    caught = sum(r.startswith("caught") for _, r, _ in listed)
    invalid = sum(r.startswith("invalid") for _, r, _ in listed)
    survived = sum(r == "survived" for _, r, _ in listed)
    print(f"\ncaught {caught} of {len(listed)} (survived {survived}, invalid {invalid})")
    eq = [r for r in results if r[0]["kind"] == "equivalent"]
    if eq:
        print(f"equivalent mutants run: {len(eq)} (not counted; see their notes in {args.list_file.name})")
    return 0 if caught == len(listed) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted (the mutated file was restored)")
