"""The data that crosses package boundaries: requests with their sampling parameters and
outputs (request.py), one scheduled step (schedule.py), the tensors of one forward pass
(batch.py), and host-to-device copies of per-step metadata (transfer.py). It sits below
layers/, models/, sampling/, executor/ and engine/, so each of them may import it."""
