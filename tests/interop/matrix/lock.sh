#!/bin/sh
# regenerate the locks: tests/interop/matrix/lock.sh [LIB...]
set -e
cd "$(dirname "$0")/libs"
UV=${UV:-uv}
for lib in ${@:-*/}; do
  lib=${lib%/}
  [ -f "$lib/requirements.in" ] || continue
  "$UV" pip compile --quiet --python 3.11 --index-url https://pypi.org/simple --no-header --annotation-style line \
    "$lib/requirements.in" -o "$lib/requirements.txt"
done
