#!/usr/bin/env bash
# Run the test suite: installs the project with its test tools, checks the external programs
# the tests drive (DCMTK, Orthanc, dicom3tools) and the scans the AI tests use, then runs pytest.  ./run-tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"

./install.sh --dev >/dev/null

missing=()
for tool in echoscu storescu storescp findscu movescu getscu Orthanc dciodvfy; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
# Real scans the AI tests wrap as DICOM: a T1 MRI with its brain mask, a head CT.
[ -f /usr/share/mricron/templates/ch2.nii.gz ] || missing+=(mricron-data)
[ -f /usr/share/doc/invesalius-examples/examples/Cranium.inv3 ] || missing+=(invesalius-examples)
if [ ${#missing[@]} -gt 0 ]; then
    packages="dcmtk orthanc orthanc-dicomweb dicom3tools mricron-data invesalius-examples"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing $packages (missing: ${missing[*]})"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
    else
        echo "missing ${missing[*]}: run  sudo apt-get install -y $packages" >&2
        exit 1
    fi
fi

# Two workers by default (pytest-xdist): most tests wait on servers and subprocesses, not on the
# CPU. Each test module runs whole in one worker, so a module's shared server stays its own.
exec .venv/bin/pytest -n "${PACSBRIDGE_TEST_WORKERS:-2}" --dist loadfile "$@"
