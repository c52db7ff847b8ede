#!/usr/bin/env bash
# The wheel as a user gets it: build it from this checkout's files, install it (not editable) into
# a fresh virtual environment, and from a temporary folder outside the checkout run a short
# real-data experiment, a 2-job sweep from a ready sweep file, one published-number file
# (+expected=, its own protocol unchanged), a re-run of the first run, and clrun-regress.
#
#   bash scripts/wheel_smoke.sh [DATA_DIR]       # default: $CLRUN_DATA_DIR, else ../shared/data
#
# The environment sees the system's site packages (torch, hydra, ...: nothing is downloaded);
# the wheel itself is installed with --no-deps into the environment, ahead of any editable
# install of the checkout, and the script checks that the package it runs is the wheel's.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
data_dir="${1:-${CLRUN_DATA_DIR:-$repo/../shared/data}}"
data_dir="$(cd "$data_dir" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/clrun-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH
export CLRUN_CACHE_DIR="$work/cache"
step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

step "build the wheel from the checkout's files"
mkdir -p "$work/src"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # tracked and new files (not ignored ones, nor build outputs); a deleted file is skipped
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$work/src"
else
    cp -r "$repo/." "$work/src"
fi
python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/cl_runner-*.whl)"
echo "$(basename "$wheel")"

step "install it into a fresh environment"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"
mkdir "$work/run"
cd "$work/run"
py="$work/venv/bin/python"
where="$("$py" -c 'import cl_runner, cl_runner.resources as r; print(cl_runner.__file__); print(r.CONF_DIR)')"
echo "$where"
case "$where" in
    "$work/venv/"*) ;;
    *) echo "the environment imports cl_runner from outside the installed wheel" >&2; exit 1 ;;
esac
case "$where" in *"$repo"*) echo "the installed wheel reads files of the checkout" >&2; exit 1 ;; esac

common=(data_dir="$data_dir" progress=false loggers=[console] checkpoint=false)

step "a short real-data experiment"
"$work/venv/bin/clrun" algo=ewc benchmark=rotatedmnist benchmark.num_tasks=2 benchmark.subset=1000 \
    benchmark.test_subset=500 "${common[@]}" hydra.run.dir=first
test -s first/results.json

step "a 2-job sweep from a ready sweep file"
"$work/venv/bin/clrun" -m +sweep=ewc_bs_lr benchmark.batch_size=10 optimizer.lr=0.01,0.1 \
    benchmark.num_tasks=2 benchmark.subset=1000 benchmark.test_subset=500 "${common[@]}" hydra.sweep.dir=sweep
test "$(ls sweep/*/results.json | wc -l)" -eq 2

step "a published-number file, its protocol unchanged"
"$work/venv/bin/clrun" +expected=der_seqmnist_sgd "${common[@]}" hydra.run.dir=expected | tee expected.log
grep -q "expected avg_acc" expected.log

step "the first run again, from its folder"
"$work/venv/bin/clrun" --rerun first hydra.run.dir=again
"$py" - <<'EOF'
import json
a, b = (json.load(open(f"{d}/results.json")) for d in ("first", "again"))
assert a["acc_matrix"] == b["acc_matrix"] and a["config"] == b["config"], "the re-run differs"
print("re-run: the same accuracy matrix", a["avg_acc"])
EOF

step "clrun-regress lists clrun's files"
"$work/venv/bin/clrun-regress" --list --tier ci > list.txt
grep -q der_seqmnist_sgd list.txt
echo "$(wc -l < list.txt) ci-tier files"
step "done"
