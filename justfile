# Recipes for tock-sse-sidecar. `just` comes from PyPI (rust-just), installed by `pip install -e '.[test]'`.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv/bin"

# List the recipes.
default:
    @just --list

# Run the sidecar on the embedded SQLite store (./sidecar.db).
serve *ARGS:
    {{venv}}/sidecar serve {{ARGS}}

# The test suite with branch coverage (the MongoDB tests need a JDK 17 with Maven, or MONGODB_URI).
test *ARGS:
    {{venv}}/python -m pytest --cov --cov-branch --cov-report=term {{ARGS}}

# The stress tests (tests/stress) at full size: STRESS_SCALE=5 is 2,000 streams / 500 users.
stress *ARGS:
    STRESS_SCALE="${STRESS_SCALE:-5}" {{venv}}/python -m pytest tests/stress -q -s -rxX --timeout 1800 {{ARGS}}

# The fault-injection run of docs/delivery.md at a larger size (CHAOS_SCALE, 4 by default:
# 20 users, 40 tabs, 160 turns each, an instance SIGKILLed every few seconds; some 150 s).
# Past 4 a run is longer, not busier (CHAOS_MAX_USERS, 20); 10 takes some 7 minutes here.
# A failed run's diagnosis (tabs' histories, logs) goes under CHAOS_DIAGNOSIS (./chaos-runs).
chaos *ARGS:
    CHAOS_SCALE="${CHAOS_SCALE:-4}" CHAOS_DIAGNOSIS="${CHAOS_DIAGNOSIS:-{{justfile_directory()}}/chaos-runs}" {{venv}}/python -m pytest tests/chaos -q -s -rxX --timeout 3600 {{ARGS}}

# bench/RESULTS.md is bench/report.py's output and nothing else; notes on the runs: docs/perf/.
# The benchmark suite (needs `pip install -e '.[bench]'`); rewrites bench/RESULTS.md and its chart.
bench *ARGS:
    {{venv}}/python -m bench --report bench/RESULTS.md {{ARGS}}

# The benchmark suite at small sizes (under 2 minutes); report under bench/results/.
bench-quick *ARGS:
    {{venv}}/python -m bench --quick {{ARGS}}

# Lint, format check, strict typing, then the tests.
check:
    {{venv}}/ruff check sidecar tests bench
    {{venv}}/ruff format --check sidecar tests bench
    {{venv}}/mypy
    {{just_executable()}} test

# Apply the formatter and the safe lint fixes.
fmt:
    {{venv}}/ruff check --fix sidecar tests bench
    {{venv}}/ruff format sidecar tests bench
