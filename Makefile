PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORE := $(VENV)/.core-installed
DEMO := output/demo
SHAPES := data/shapes
DEMO_CONFIG := configs/maskrcnn_R18_FPN_small.yaml
# A smaller or longer demo: make demo SHAPES_OPTS="--num-train 200 --num-val 50" DEMO_OVERRIDES="solver.max_iter=100"
SHAPES_OPTS ?=
DEMO_OVERRIDES ?=

.PHONY: setup test demo figures transfer clean

# Create the virtual environment from nothing and install the package: $(CORE) with what training,
# evaluation and inference need (all that the demo runs), $(STAMP) with the test extras on top (the exporters,
# the service, the browser driver, Ray) and, in .venv/annotation-tools, the annotation tools the pre-annotation
# round trips run (labelme, datumaro, Label Studio: their pins clash with ours, so they live apart).
$(CORE): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e .
	touch $(CORE)

$(STAMP): $(CORE) tests/annotation_tools/requirements.txt
	$(PY) -m pip install --quiet -e '.[test]'
	bash tests/annotation_tools/setup.sh
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

# Generate the shapes data (reused when present), train the small model (resumed when a checkpoint
# exists), evaluate it and draw validation overlays.
demo: $(CORE)
	$(PY) tools/make_shapes.py --out $(SHAPES) $(SHAPES_OPTS)
	$(PY) tools/train.py --config $(DEMO_CONFIG) --resume train.output_dir=$(DEMO) $(DEMO_OVERRIDES)
	$(PY) tools/eval.py --checkpoint $(DEMO)/model_final.pth --ann $(SHAPES)/annotations/instances_val.json \
		--images $(SHAPES)/val --output $(DEMO)
	$(PY) tools/infer.py --checkpoint $(DEMO)/model_final.pth --input $(SHAPES)/val --output $(DEMO)/overlays \
		--label-map
	$(PY) tools/analyze.py --results $(DEMO)/results.json --ann $(SHAPES)/annotations/instances_val.json --images $(SHAPES)/val --output $(DEMO)/report
	@echo
	@echo "checkpoint:   $(DEMO)/model_final.pth"
	@echo "metrics:      $(DEMO)/metrics.json"
	@echo "loss curve:   $(DEMO)/loss_curve.png"
	@echo "overlays:     $(DEMO)/overlays/"
	@$(PY) -c "import json; m = json.load(open('$(DEMO)/metrics.json')); print(f\"mask AP {m['segm']['AP']:.3f}  box AP {m['bbox']['AP']:.3f}  (shapes val, {m['images']} images)\")"

# Redraw the committed figures of docs/how-it-works.md from the demo model (run make demo first).
figures: $(CORE)
	$(PY) tools/explain.py --checkpoint $(DEMO)/model_final.pth --shapes --output docs/figures \
		--log $(DEMO)/metrics.jsonl --metrics $(DEMO)/metrics.json

# Train the demo configuration on 100 images of shapes the demo model never saw (stars, hexagons,
# crosses), from scratch and from the demo checkpoint, and print both APs at 100, 200 and 300 iterations.
transfer: $(CORE)
	test -f $(DEMO)/model_final.pth || $(MAKE) demo
	$(PY) -m benchmarks.transfer_demo --checkpoint $(DEMO)/model_final.pth --config $(DEMO_CONFIG) \
		--data data/shapes_novel --output output/transfer

# Train the demo configuration on large, thin, sharp-cornered shapes (data/shapes_edges: sunbursts, gears, combs on
# 512-800 px images) with the plain 28x28 mask head and with the point-refined one, from one shared start and for
# the same iterations, and print mask AP, AP75 and Boundary AP side by side (output/edges/edges.json).
.PHONY: edges
edges: $(CORE)
	$(PY) -m benchmarks.edges --config $(DEMO_CONFIG) --data data/shapes_edges --output output/edges

# Redraw docs/figures/refinement.png (how-it-works.md) from the refined model of make edges: the largest object of
# validation image 5 of the edge shapes, its 28x28 and its point-refined mask, and the cells the refinement chose.
.PHONY: figures-refinement
figures-refinement: $(CORE)
	test -f output/edges/refined/model_final.pth || $(MAKE) edges
	$(PY) tools/explain.py --refinement --checkpoint output/edges/refined/model_final.pth \
		--image data/shapes_edges/val/000005.jpg --ann data/shapes_edges/annotations/instances_val.json \
		--output docs/figures

clean:
	rm -rf $(VENV) $(DEMO) output/transfer
