#!/bin/sh
# Prints the path of the first Python >= 3.12 that actually runs, or one error line (exit 1).
# Order: $PYTHON if set; python3.12, python3.13, python3.14, python3, python in every PATH
# directory (a pyenv shim that refuses to run is skipped); then pyenv's installed versions.
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
try() { if ok "$1"; then "$1" -c 'import sys; print(sys.executable)'; exit 0; fi; }

if [ -n "${PYTHON:-}" ]; then
    try "$PYTHON"
    echo "PYTHON=$PYTHON is not a working Python >= 3.12" >&2
    exit 1
fi
for name in python3.12 python3.13 python3.14 python3 python; do
    old_ifs=$IFS; IFS=:
    for dir in $PATH; do
        IFS=$old_ifs
        if [ -x "${dir:-.}/$name" ]; then try "${dir:-.}/$name"; fi
    done
    IFS=$old_ifs
done
if command -v pyenv >/dev/null 2>&1; then
    for exe in "$(pyenv root)"/versions/*/bin/python3; do
        if [ -x "$exe" ]; then try "$exe"; fi
    done
fi
echo "no Python >= 3.12 found (tried python3.12, python3.13, python3.14, python3, python on" \
    "PATH and pyenv's versions); install one or run make PYTHON=/path/to/python3.12" >&2
exit 1
