#!/bin/sh
# Reproduce every committed result folder (CPU; trained models are cached under data/models).
# Each sweep resumes: rerunning skips the rows already in its results.csv.
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY -m tropnnc.experiments.sweep --experiment E3 --out results/E3 --threads 1
$PY -m tropnnc.experiments.sweep --experiment E3 --out results/E3-reference-protocol \
    --seeds 0 1 2 --epochs 8 --train-option patience=none val_fraction=0 --threads 1
$PY -m tropnnc.experiments.sweep --experiment E3 --out results/E3-tropnnc-options \
    --methods tropnnc tropnnc:restarts=16 tropnnc:norm=max tropnnc:steps=3 tropnnc:refine=20 \
    tropnnc:norm=l1,refine=5 tropnnc:norm=l1,restarts=16 --threads 1
$PY -m tropnnc.experiments.sweep --experiment E2 --out results/E2 --threads 1
$PY -m tropnnc.experiments.sweep --experiment E2 --dataset mnist-subset --out results/E2-mnist-subset \
    --threads 1
$PY -m tropnnc.experiments.sweep --experiment E1 --out results/E1 --threads 1
$PY -m tropnnc.experiments.sweep --experiment E4 --out results/E4 --threads 1
$PY -m tropnnc.experiments.sweep --experiment E3 --out results/E3-greedy-seeding \
    --methods tropnnc tropnnc:norm=l1 tropnnc:refine=5 tropnnc+refit --threads 1
$PY -m tropnnc.experiments.sweep --experiment E2 --out results/E2-greedy-seeding \
    --methods tropnnc tropnnc:norm=l1 tropnnc:refine=5 tropnnc+refit --threads 1
$PY -m tropnnc.experiments.sweep --experiment E3 --out results/expected-error/E3 --threads 1 \
    --methods tropnnc tropnnc+ls tropnnc+ls:ls.shrink=0.5 model-folding model-folding+ls \
    model-folding+ls:ls.shrink=0.5 neural-path-kmeans neural-path-kmeans+ls \
    neural-path-kmeans+ls:ls.shrink=0.5 l1+ls default torch-pruning
$PY -m tropnnc.experiments.sweep --experiment E2 --out results/expected-error/E2 --threads 1 \
    --methods tropnnc tropnnc+ls model-folding model-folding+ls neural-path-kmeans \
    neural-path-kmeans+ls tropnnc+ls:kernel=activations model-folding+ls:ls.shrink=0.8 \
    default torch-pruning
$PY -m tropnnc.experiments.sweep --networks vgg-small --dataset fashion-mnist --layers conv \
    --epochs 2 --train-size 12000 --test-size 2000 --seeds 0 1 2 --keeps 0.9 0.75 0.5 0.25 \
    --out results/expected-error/bn-vgg-small --threads 1 \
    --methods tropnnc tropnnc+ls model-folding model-folding+ls neural-path-kmeans \
    neural-path-kmeans+ls l1 l1+ls tropnnc+ls:ls.shrink=0.5 model-folding+ls:ls.shrink=0.5 \
    tropnnc+ls:kernel=activations default torch-pruning
$PY -m tropnnc.experiments.sweep --experiment E4 --out results/expected-error/E4 --threads 1 \
    --seeds 0 1 2 3 4 --layers conv --keeps 0.9 0.75 0.6 0.5 \
    --methods default model-folding neural-path-kmeans tropnnc torch-pruning
