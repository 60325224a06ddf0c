# Two entry points for a fresh machine: `make demo` and `make test`. Both create (or reuse) the project
# virtual environment in .venv and install what they need into it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgeml-installed
# torch is pinned here to the CPU wheel this machine carries; the package itself asks for a range.
TORCH  ?= torch==2.13.0
EXTRAS ?= agent,ort,litert,delta,compile,tflite,train,fleet,dev

.PHONY: install services demo test test-pi lint typecheck bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# onnx2tf's own pins would downgrade numpy/onnx/TensorFlow: install it beside the stack.
	$(PY) -m pip install -q --no-deps onnx2tf==1.29.24
	touch $(STAMP)

install: $(STAMP)

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/edgeml demo

# Tests start their own Mosquitto on a free port, drive Debian's chromium for the dashboard, and emulate a
# Raspberry Pi with qemu-user-static and debootstrap (tests/pi); install them where they are missing (Debian,
# as root).
services:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq mosquitto mosquitto-clients; } || \
	  echo "mosquitto is not installed: broker tests will skip (and fail under EDGEML_REQUIRE_SERVICES=1)"
	@command -v chromium >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium; } || \
	  echo "chromium is not installed: the dashboard test will skip (and fail under EDGEML_REQUIRE_SERVICES=1)"
	@{ test -x /usr/bin/qemu-aarch64-static || [ "$$(uname -m)" = aarch64 ]; } && command -v debootstrap >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq qemu-user-static debootstrap; } || \
	  echo "qemu-user-static or debootstrap is not installed: the emulated Pi will skip (and fail under EDGEML_REQUIRE_SERVICES=1)"

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(PY) tools/typecheck.py

test: services lint typecheck
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

# Only the emulated Raspberry Pi (also part of `make test`): the Pi image built from deploy/raspberrypi/Dockerfile
# in an arm64 Debian 12 under qemu (cached in .build/pi-rootfs, or $$EDGEML_PI_CACHE, keyed by what it installs),
# the agent run in it against a real fleet on this machine (docs/devices.md). About 11 minutes cold, 3-4 cached.
test-pi: install services
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest tests/pi

bench: install services
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/compile_bench.py --out benchmarks/results-compile.md
	# which ONNX op types each target supports, measured; rewrites the table in docs/compile.md (~30 min on 2 cores)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/op_table.py --out benchmarks/results-ops.md --docs docs/compile.md
	$(PY) benchmarks/distribution_bench.py --out benchmarks/results-distribution.md
	# captured samples uploaded to the fleet vs raw MQTT publishes of the same bytes
	$(PY) benchmarks/capture_bench.py --out benchmarks/results-capture.md
	# delta updates of a MobileNet-style model: head-only, last block, full fine-tune, re-calibration (~15 min)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/delta_bench.py --out benchmarks/results-delta.md
	$(PY) benchmarks/agent_bench.py --out benchmarks/results-agent.md
	$(PY) benchmarks/ingest_bench.py
	$(PY) benchmarks/drift_bench.py
	$(PY) benchmarks/fleet_bench.py --out benchmarks/results-fleet.md
	# telemetry reads (scrape, dashboard, rollout signals) against 100k-10M rows of history, SQLite and PostgreSQL, and ingestion while retention runs (~1.5 h on 2 cores)
	$(PY) benchmarks/telemetry_scale_bench.py --ingest --out benchmarks/results-telemetry-scale.md

clean:
	rm -rf .build .edgeml-demo .pytest_cache .mypy_cache .ruff_cache
