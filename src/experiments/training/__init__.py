"""Training: the strategies (inline, two-stage, fine-tune), their Keras callbacks, compiling
for the device, the devices one run spans (data-parallel), and the checkpoints a run resumes
from."""
