"""Training: the strategies (inline, two-stage, fine-tune), their Keras callbacks, compiling
for the device, and the checkpoints a run resumes from."""
