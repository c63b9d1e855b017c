#!/usr/bin/env bash
# Copy a reference repository's files into a working folder, from a checkout or a bare mirror
# (the mirrors `fetch` makes have no work tree; some large files are absent from them).
# usage: bench/ref_checkout.sh SRC REF
set -euo pipefail
SRC="${1:?usage: bench/ref_checkout.sh SRC REF}"; REF="${2:?usage: bench/ref_checkout.sh SRC REF}"
mkdir -p "$REF"
if [ -d "$SRC/objects" ] || [ -f "$SRC/HEAD" ]; then
  for f in $(git --git-dir="$SRC" ls-tree -r --name-only HEAD); do
    mkdir -p "$REF/$(dirname "$f")"
    git --git-dir="$SRC" show HEAD:"$f" > "$REF/$f" 2>/dev/null || rm -f "$REF/$f"
  done
else
  cp -r "$SRC"/. "$REF"/
fi
