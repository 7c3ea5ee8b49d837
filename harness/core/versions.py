"""The harness's version and the version of its math (part of every trial's identity)."""

__version__ = "0.1.0"

# Bumped whenever a change alters the numbers a trial produces (losses, data, schedules): it is part
# of every trial's identity, so finished results computed by older math are rerun, not reused.
# 2: the input pipeline normalises as x * scale + bias (rounding differs from v1)
# 3: the method's random choices come from their own generator, no longer interleaved with the data's
# 4: WS-DAN maps drawn with replacement, AAM centres by Wen et al.'s rule, MKSMT with PyTorch 1.x zero_grad,
#    Swin's final norm on the last stage
# 5: train.precision (default auto: bf16 only where the device has bf16 units) replaces train.amp
# 6: Residual Attention as its prototxt (2r lowest units, bias-free head, stages 1-3), test/acc_best at the primary
#    head's best epoch, localisation by the literature's definitions on a stage that resolves parts, synthfg's
#    targets every separating part, GAIN_ext on a fraction of images, RA-CNN's VGG fc layers and APN pre-training
# 7: localisation in the trial's precision (bf16 trials' scores move; fp32's are the same to the bit), the
#    throughput measure interleaved with the training (train/images_per_s_rel), synthfg render 3 the default
MATH_VERSION = 7
