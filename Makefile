# msao: the two commands a new machine needs are `make demo` and `make test`.
# Everything else here is a step they run (or a workstation step: `make models`, `make export`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.msao-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BUILTINS := msao-tiny-edge msao-tiny-cloud
CHECKPOINTS := $(wildcard msao/export/checkpoints/*/*)

.PHONY: setup broker chromium demo test models export eval lint clean

## setup: virtual environment with msao[dev] (torch CPU, transformers, onnxruntime) + mosquitto
setup: $(STAMP) broker

$(STAMP): pyproject.toml
	@echo "==> [1/2] creating $(VENV) (Python: $$($(PYTHON) --version))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> [2/2] installing msao[dev]: torch==2.13.0 (CPU), transformers, onnx, onnxruntime, test tools (a few minutes the first time)"
	@$(BIN)/python -m pip install --upgrade --progress-bar off pip >/dev/null
	@$(BIN)/python -m pip install --progress-bar off -e '.[dev]' | grep -E '^(Successfully|ERROR)' || true
	@$(BIN)/python -c "import msao, torch, onnxruntime" || { echo "install failed; see pip's output above"; exit 1; }
	@touch $@

broker:
	@command -v mosquitto >/dev/null || { echo "==> installing mosquitto (Debian package)"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q mosquitto mosquitto-clients >/dev/null; }
	@command -v mosquitto >/dev/null && echo "==> mosquitto: $$(mosquitto -h 2>/dev/null | head -1)"

# headless Chromium drives the live web view (GET /ui) in tests/edge_runtime/test_web_view.py
chromium:
	@command -v chromium >/dev/null || { echo "==> installing chromium (Debian package)"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium >/dev/null; }
	@command -v chromium >/dev/null && echo "==> chromium: $$(chromium --version 2>/dev/null | head -1)"

## test: the whole suite (CI runs this through .ci/run); it also compiles msao/engines/mas.cu for sm_87 and sm_90 with nvcc
test: setup chromium integrations
	$(BIN)/python -m pytest -q

# chromium drives the web view's test; the integrators' tools the suite drives where this machine can install them (Node-RED from npm); skipped, said, where not
.PHONY: integrations
integrations:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory node-red || echo "==> Node-RED could not be installed: its test will be skipped"; \
	  else echo "==> no npm: the Node-RED test will be skipped (Debian package npm installs it)"; fi

## models: retrain the built-in checkpoints (replaces the committed ones; see docs/models.md for time)
models: $(STAMP)
	$(BIN)/msao train

## export: bundles/msao-tiny-edge and bundles/msao-tiny-cloud, each checked and profiled, and their calibration
export: $(foreach m,$(BUILTINS),bundles/$(m)/manifest.json) bundles/calibration.json

bundles/%/manifest.json: $(STAMP) $(CHECKPOINTS)
	$(BIN)/msao export --model $* --out bundles/$*

# accuracy/confidence tables the edge scheduler plans with (easy-VQA train data; ~6 min on 2 cores)
bundles/calibration.json: $(foreach m,$(BUILTINS),bundles/$(m)/manifest.json)
	$(BIN)/msao calibrate --edge bundles/msao-tiny-edge --large bundles/msao-tiny-cloud --out $@

## eval: full easy-VQA test accuracy of both built-in bundles (the numbers in docs/models.md)
eval: export
	@for m in $(BUILTINS); do $(BIN)/msao eval --bundle bundles/$$m; done

## demo: a local broker, a cloud worker and the edge daemon on the built-in bundles, asked real easy-VQA questions over MQTT and HTTP
demo: setup export
	$(BIN)/python -m examples.demo

## bench: both regimes and the fleet (bench.suite --quick, <= 15 min): the paper's (scenes pair, small model only on an Orin-NX-dilated edge), the resident one (easy-VQA pair, both models at a quarter core), 4 edges x 1 worker
.PHONY: bench bench-full
bench: $(STAMP) export bundles/calibration-scenes.json
	$(BIN)/python -m bench.suite --quick

## bench-full: the same with 300 requests per paper cell, 1,000 per resident cell, the full load test and fleet ladder (about 80 minutes on 2 cores)
bench-full: $(STAMP) export bundles/calibration-scenes.json
	$(BIN)/python -m bench.suite

## bench-sim: the scaled SIMULATION (msao's scheduler on figures derived from published ones), one run per profile: LLaVA-1.5 7B/13B (Orin NX vs A100) and the paper's pair, Qwen2-VL-2B on an Orin NX and on an AGX Orin with Qwen2.5-VL-7B on an A100 (~2 min each); SIM_ARGS passes flags
.PHONY: bench-sim
SIM_ARGS ?=
SIM_PROFILES := llava15-7b-13b_orin-nx_vs_a100 qwen2-vl-2b_qwen25-vl-7b_orin-nx_vs_a100 qwen2-vl-2b_qwen25-vl-7b_agx-orin_vs_a100
bench-sim: $(STAMP)
	@for p in $(SIM_PROFILES); do $(BIN)/python -m bench.simulate --profile bench/profiles/$$p.toml $(SIM_ARGS) || exit 1; done

## bench-bridge: cloud bridge numbers (codec vs memcpy, zstd on real hidden states, loopback job round trips vs floors)
.PHONY: bench-bridge
bench-bridge: $(STAMP) bundles/msao-tiny-cloud/manifest.json
	@mkdir -p bench/results
	$(BIN)/python bench/cloud_bridge.py --bundle bundles/msao-tiny-cloud --out bench/results/cloud_bridge.json

## bench-mas: MAS evidence for docs/mas.md (accuracy per keep policy and ratio on all 9,673 test questions, MAS cost, probes, stream workload; ~30 min on 2 cores)
.PHONY: bench-mas
bench-mas: $(STAMP) bundles/msao-tiny-cloud/manifest.json
	@mkdir -p bench/results
	$(BIN)/python bench/mas.py --bundle bundles/msao-tiny-cloud --out bench/results/mas.json
	$(BIN)/python bench/mas.py --bundle bundles/msao-tiny-cloud --ratios 0.0625,0.015625 --policies mas,random,saliency \
	  --skip cost,saliency,alignment,stream --out bench/results/mas_low_ratios.json

## bench-mas-scenes: the same on the scenes workload (5,000 test questions; keep 100 .. 6.25 %; MAS vs random vs saliency curve as PNG)
.PHONY: bench-mas-scenes
bench-mas-scenes: $(STAMP) bundles/msao-scenes-cloud/manifest.json
	@mkdir -p bench/results
	$(BIN)/python bench/mas.py --dataset scenes --bundle bundles/msao-scenes-cloud --ratios 1,0.5,0.25,0.125,0.0625 \
	  --policies mas,random,saliency --out bench/results/mas_scenes.json

## bench-speculation: token-level speculation on the scenes pair, offline (describe family, 500 test questions): identity, acceptance, cloud passes per token (docs/speculation.md)
.PHONY: bench-speculation
bench-speculation: $(STAMP) bundles/msao-scenes-edge/manifest.json bundles/msao-scenes-cloud/manifest.json
	@mkdir -p bench/results
	$(BIN)/python bench/speculation.py --edge bundles/msao-scenes-edge --cloud bundles/msao-scenes-cloud --out bench/results/speculation.json

## bench-uploads: upload forms live on the scenes pair (edge holds only the small model), cloud_only vs msao on lte and congested, 300 test questions each (docs/scheduler.md)
.PHONY: bench-uploads
bench-uploads: $(STAMP) bundles/calibration-scenes.json
	@mkdir -p bench/results
	$(BIN)/python -m bench.scenes_live --calibration bundles/calibration-scenes.json --out bench/results/uploads.json

## bench-speculation-live: token-level speculation live on the scenes pair (describe questions, >= 3 tokens), lte, the edge dilated x30 (docs/speculation.md)
.PHONY: bench-speculation-live
bench-speculation-live: $(STAMP) bundles/calibration-scenes.json
	@mkdir -p bench/results
	$(BIN)/python -m bench.scenes_live --calibration bundles/calibration-scenes.json --policies cloud_only,speculative,msao --family describe \
	  --links lte --questions 150 --edge-dilation 30 --out bench/results/speculation_live.json

## bundles/calibration-scenes.json: the scenes pair calibrated on 1,000 scenes train questions (~6 min)
bundles/calibration-scenes.json: bundles/msao-scenes-edge/manifest.json bundles/msao-scenes-cloud/manifest.json
	$(BIN)/msao calibrate --edge bundles/msao-scenes-edge --large bundles/msao-scenes-cloud --dataset scenes --questions 1000 --out $@

## bench-genai: Qwen2-VL-2B widths (4 decoder layers, 2 vision blocks, random weights): export it (~5 min, ~10 GB), then msao vs onnxruntime-genai decode (docs/qwen.md)
.PHONY: bench-genai
REAL := build/real-widths
$(REAL)/qwen2-vl-2b-widths/config.json: $(STAMP)
	$(BIN)/python -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from bench.real_width_models import make_qwen2_vl_2b_widths as m; m(Path('$(REAL)/qwen2-vl-2b-widths'))"
bundles/qwen2-vl-2b-widths/manifest.json: $(REAL)/qwen2-vl-2b-widths/config.json
	$(BIN)/msao export --model $(REAL)/qwen2-vl-2b-widths --out bundles/qwen2-vl-2b-widths --check-questions 4 --max-new-tokens 4 --profile-repeats 1
bench-genai: bundles/qwen2-vl-2b-widths/manifest.json
	$(BIN)/pip install -q onnxruntime-genai==0.18.0 onnx_ir==1.1.0
	$(BIN)/python bench/genai_compare.py --bundle bundles/qwen2-vl-2b-widths --model $(REAL)/qwen2-vl-2b-widths --out bench/results/genai-compare.json

## bench-load: 4 edge daemons x 3 cloud workers on loopback for 60 s (lost must be 0), then cloud throughput with 1..3 workers (~5 min)
.PHONY: bench-load soak
bench-load: $(STAMP) export
	@mkdir -p bench/results
	$(BIN)/python -m bench.load --out bench/results/load.json

## bench-fleet: the paper's regime as a fleet: 4 edge daemons (small model only, dilated per kind of work as an Orin NX) share 1 cloud worker on lte, cloud_only vs msao up a Poisson rate ladder to 128/s (docs/benchmarks.md)
.PHONY: bench-fleet
bench-fleet: $(STAMP) bundles/calibration-scenes.json
	@mkdir -p bench/results
	$(BIN)/python -m bench.fleet --edge-dilation-profile bench/profiles/dilation_orin-nx_vs_a100.toml --out bench/results/fleet.json

## soak: the paper-regime fleet (4 edges x 1 worker, lte) at a steady rate for SOAK_MINUTES, a broker restart and a worker crash along the way; RSS, descriptors and threads of every process each minute; pass = 0 lost, no growth (not in CI)
SOAK_MINUTES ?= 120
soak: $(STAMP) broker bundles/calibration-scenes.json
	@mkdir -p bench/results
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES) --out bench/results/soak.json

## fuzz: atheris (x86-64; a Hypothesis loop elsewhere) on the request parsers, codec, chunking, image decoder and ids, FUZZ_S seconds per target
.PHONY: fuzz
FUZZ_S ?= 60
fuzz: $(STAMP)
	@$(BIN)/python -m pip install --progress-bar off -q -e '.[fuzz]' || echo "atheris not installable here; using the Hypothesis loop"
	$(BIN)/python -m tests.fuzz.run_fuzz --seconds $(FUZZ_S)

## node-red: Node-RED under build/node-red for tests/deploy/test_node_red.py and deploy/node-red/ (npm; 4.1.x: Node-RED 5 needs Node.js >= 22.9)
.PHONY: node-red
NODE_RED_VERSION ?= 4.1.8
node-red: build/node-red/node_modules/.bin/node-red

build/node-red/node_modules/.bin/node-red:
	@command -v npm >/dev/null || { echo "npm is not installed: Debian package npm (Node.js >= 18.5), or Node.js from nodejs.org"; exit 1; }
	@mkdir -p build/node-red
	npm install --no-audit --no-fund --prefix build/node-red node-red@$(NODE_RED_VERSION)
	@build/node-red/node_modules/.bin/node-red --help >/dev/null 2>&1 || { echo "node-red installed but does not run on Node.js $$(node --version)"; exit 1; }

lint: $(STAMP)
	$(BIN)/ruff check msao tests bench examples
	$(BIN)/vermin --target=3.10- --no-tips --violations --eval-annotations msao

clean:
	rm -rf bundles .pytest_cache .ruff_cache
