#!/usr/bin/env bash
# The shipped suite as a consumer gets it: build kvcompress's wheel, install
# it with the test extra in a fresh virtualenv, and from an empty folder (no
# clone anywhere on the path) verify a correct and a wrong implementation of
# one kind, with kvcompress-verify and with pytest --pyargs. Run by .ci/run
# (README.md, marker wheel-command). Usage: bash scripts/check_wheel.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
rm -rf "$repo/build"   # setuptools' in-tree build folder may hold files deleted since
"$work/venv/bin/pip" wheel -q --no-deps -w "$work/dist" "$repo"
wheel=$(ls "$work"/dist/kvcompress-*.whl)
listing=$(unzip -l "$wheel")
for f in kvcompress_reference/linear.py kvcompress/testing/plugin.py kvcompress/testing/properties/test_conformance.py; do
    grep -q "$f" <<< "$listing" || { echo "check_wheel: the wheel lacks $f" >&2; exit 1; }
done
"$work/venv/bin/pip" install -q -c "$repo/constraints/cpu.txt" "$wheel[test]"
mkdir "$work/consumer" && cd "$work/consumer"
cat > mykernels.py <<'PY'
import kvcompress.functional as kf


def linear(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """A correct kernel: the built-in torch path."""
    return kf.linear(x, weight, bias, block_size=block_size, stride=stride, padding=padding, pe=pe,
                     cu_seqlens=cu_seqlens, backend="torch")


def linear_last_token_dropped(x, weight, bias=None, *, block_size, stride, padding="valid", pe=None, cu_seqlens=None):
    """A wrong kernel: every window's last position is ignored."""
    w = weight.clone()
    w[:, -1] = 0
    return kf.linear(x, w, bias, block_size=block_size, stride=stride, padding=padding, pe=pe,
                     cu_seqlens=cu_seqlens, backend="torch")
PY
export PYTHONPATH="$work/consumer" KVCOMPRESS_PROFILE=dev
unset KVCOMPRESS_REPORT || true
"$work/venv/bin/python" - <<'PY'
import kvcompress, kvcompress_reference
for m in (kvcompress, kvcompress_reference):
    assert "site-packages" in m.__file__, f"{m.__name__} comes from {m.__file__}, not the installed wheel"
PY
v="$work/venv/bin/kvcompress-verify"
sel="matches_reference or gradients_match or locality"
"$v" --impl linear=mykernels:linear --impl-dtypes float32,bfloat16 -k "$sel" > good.log 2>&1 \
    || { cat good.log; echo "check_wheel: kvcompress-verify failed a correct kernel" >&2; exit 1; }
grep -q "2 of 2 kind x backend x dtype combinations pass" good.log || { cat good.log; exit 1; }
if "$v" --impl linear=mykernels:linear_last_token_dropped --impl-dtypes float32 -k "$sel" > bad.log 2>&1; then
    cat bad.log; echo "check_wheel: kvcompress-verify passed a wrong kernel" >&2; exit 1
fi
grep -q "FAIL" bad.log && grep -q "Case(kind='linear'" bad.log || { cat bad.log; echo "check_wheel: no shrunk case" >&2; exit 1; }
p=("$work/venv/bin/python" -m pytest -p no:cacheprovider -q --pyargs kvcompress.testing.properties)
"${p[@]}" --impl linear=mykernels:linear --impl-dtypes float32 -k "$sel" > good-pytest.log 2>&1 \
    || { cat good-pytest.log; echo "check_wheel: pytest --pyargs failed a correct kernel" >&2; exit 1; }
if "${p[@]}" --impl linear=mykernels:linear_last_token_dropped --impl-dtypes float32 -k "$sel" > bad-pytest.log 2>&1; then
    cat bad-pytest.log; echo "check_wheel: pytest --pyargs passed a wrong kernel" >&2; exit 1
fi
grep -q "Case(kind='linear'" bad-pytest.log && grep -q "@reproduce_failure" bad-pytest.log \
    || { cat bad-pytest.log; echo "check_wheel: no shrunk case" >&2; exit 1; }
echo "check_wheel: the wheel's suite passed the correct kernel and failed the wrong one, from an empty folder"
tail -n 4 good.log
