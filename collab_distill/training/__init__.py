"""The parts of a training run: its state objects, the step's pieces (forward passes, the
bilevel step, guards) and the lifecycle services registered as built-in plugins."""
