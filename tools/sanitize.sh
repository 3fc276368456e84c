#!/usr/bin/env bash
# Build normkit with AddressSanitizer + UndefinedBehaviorSanitizer into a separate virtual
# environment and run the test suite under it.
#
#   tools/sanitize.sh                    # whole default suite
#   tools/sanitize.sh -k layer_norm -x   # extra arguments go to pytest
#
# Environment:
#   NK_ASAN_VENV   the venv to (re)use          (default /tmp/nk-asan)
#   NK_ASAN_BUILD  the CMake build directory     (default $NK_ASAN_VENV/build)
#   NK_ASAN_SKIP_BUILD=1  reuse the existing build, only run the tests
#   PYTHON         the interpreter for a new venv (default: the one of .venv, else python3)
#
# Python itself "leaks" by design (interned objects, caches at exit), so LeakSanitizer is off;
# any ASan or UBSan report aborts the process (halt_on_error) and fails the run. An impossible
# allocation returns NULL (allocator_may_return_null), so tests that expect MemoryError work.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NK_ASAN_VENV:-/tmp/nk-asan}"
BUILD="${NK_ASAN_BUILD:-$VENV/build}"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON="$ROOT/.venv/bin/python"
  else
    PYTHON="python3"
  fi
fi

CC_BIN="${CC:-gcc}"
LIBASAN="$("$CC_BIN" -print-file-name=libasan.so)"
if [[ ! -e "$LIBASAN" ]]; then
  echo "sanitize.sh: libasan.so not found via '$CC_BIN -print-file-name=libasan.so'" >&2
  exit 2
fi
# The runtime must match the compiler that builds the extension.
export CC="$CC_BIN" CXX="${CXX:-g++}"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== creating $VENV"
  # The base interpreter (not the project's venv) creates the new one.
  BASE="$("$PYTHON" -c 'import sys; print(sys._base_executable)')"
  "$BASE" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if [[ "${NK_ASAN_SKIP_BUILD:-0}" != 1 ]]; then
  echo "== installing build and test requirements into $VENV"
  # Same versions as the project's venv where it has them (offline-friendly via pip's cache).
  REQS=(scikit-build-core pybind11 numpy pytest hypothesis ml_dtypes cmake ninja)
  if [[ -x "$ROOT/.venv/bin/python" ]]; then
    mapfile -t PINNED < <("$ROOT/.venv/bin/python" -m pip freeze 2>/dev/null \
      | grep -i -E '^(scikit[-_]build[-_]core|pybind11|numpy|pytest|hypothesis|ml[-_]dtypes|cmake|ninja)==' || true)
    if [[ ${#PINNED[@]} -gt 0 ]]; then
      REQS=("${PINNED[@]}")
    fi
  fi
  "$VPY" -m pip install -q "${REQS[@]}"

  echo "== building normkit with -fsanitize=address,undefined (build dir $BUILD)"
  t0=$SECONDS
  "$VPY" -m pip install --no-build-isolation --no-deps -q "$ROOT" \
    -Cbuild-dir="$BUILD" \
    -Ccmake.build-type=RelWithDebInfo \
    -Ccmake.define.NORMKIT_SANITIZE=address,undefined \
    -Ccmake.define.NORMKIT_CUDA=OFF \
    -Ccmake.define.NORMKIT_WERROR=OFF
  echo "== build took $((SECONDS - t0)) s"
fi

# The extension must really be instrumented (and must be the one imported, not the source tree).
# (Located without importing it: loading it before libasan is preloaded aborts.)
PLAT="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
SO="$(ls "$PLAT"/normkit/_core*.so 2>/dev/null | head -n 1 || true)"
if [[ -z "$SO" ]]; then
  echo "sanitize.sh: no normkit/_core*.so under $PLAT (is normkit installed in $VENV?)" >&2
  exit 2
fi
# (ldd's output is captured first: `ldd | grep -q` under pipefail fails at random, because grep -q
# exits at the first match and ldd then dies of SIGPIPE while writing its remaining lines.)
LDD_OUT="$(ldd "$SO")"
if ! grep -q libasan <<< "$LDD_OUT"; then
  echo "sanitize.sh: $SO is not linked against libasan; ldd says:" >&2
  echo "$LDD_OUT" >&2
  exit 2
fi
echo "== extension: $SO"

export LD_PRELOAD="$LIBASAN${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:print_stacktrace=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}"

export NORMKIT_SANITIZER_RUN=1  # tests/test_offsets.py skips (see there)
echo "== running pytest under ASan+UBSan"
t0=$SECONDS
cd "$ROOT"
set +e
# -p no:cacheprovider: do not write .pytest_cache from the sanitizer run.
"$VPY" -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
echo "== pytest exit status $rc after $((SECONDS - t0)) s"
exit $rc
