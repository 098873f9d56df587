#!/bin/sh
# OpenBLAS (cmeel-openblas) links libgfortran5, which Debian/Ubuntu do not always ship.
# Install it when we can; kvgrove itself warns (and falls back to MLX's slow reference BLAS)
# when it cannot load OpenBLAS.
set -u
[ "$(uname -s)" = Linux ] || exit 0
if ldconfig -p 2>/dev/null | grep -q 'libgfortran.so.5'; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing libgfortran5 (needed by OpenBLAS)"
    apt-get install -y -q libgfortran5 >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libgfortran5 >/dev/null 2>&1; } \
        || echo "warning: could not install libgfortran5; kvgrove will use MLX's slow reference BLAS"
else
    echo "warning: libgfortran5 is missing; install it (e.g. 'sudo apt-get install libgfortran5')" \
         "for fast CPU math"
fi
exit 0
