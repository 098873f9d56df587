#!/bin/sh
# MLX's Linux wheel links a slow reference BLAS; kvgrove loads the distro's OpenBLAS (built for
# every CPU) in its place.
# Install it when we can; kvgrove itself warns (and falls back to MLX's slow reference BLAS)
# when it cannot load OpenBLAS.
set -u
[ "$(uname -s)" = Linux ] || exit 0
if [ -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 ] || [ -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing libopenblas0-pthread (needed by OpenBLAS)"
    apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1; } \
        || echo "warning: could not install libopenblas0-pthread; kvgrove will use MLX's slow reference BLAS"
else
    echo "warning: libopenblas0-pthread is missing; install it (e.g. 'sudo apt-get install libopenblas0-pthread')" \
         "for fast CPU math"
fi
exit 0
