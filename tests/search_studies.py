"""Tiny search studies shared by the search tests (tests/test_search*.py)."""

SEARCH_STUDY = """
name: tuned
method: {name: baseline}
dataset: {name: synthfg, classes: 4, train_per_class: 10, test_per_class: 4}
backbone: {name: resnet18, kwargs: {channels: [8, 16, 32, 64], stem_width: 8}}
train: {epochs: 3, batch_size: 8, image_size: 32, resize: 36, lr: 0.05, precision: fp32}
report: {maps: 0}
grid:
  method:
    - {name: baseline}
    - {name: pmg, stages: 2, feature_size: 16, stage_dim: 32, backbone_lr_scale: 1.0, early_exit: true}
seeds: [0]
table: {rows: method}
search:
  space:
    train.lr: loguniform(1.0e-3, 0.3)
  methods:
    pmg:
      space:
        method.stages: choice([1, 2])
  budget: {trials: 3}
  searcher: random
  scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
"""
