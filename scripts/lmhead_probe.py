# host time of the LM head's matmul for row counts never seen before vs repeated (is it cuBLAS's per-shape setup?)
import time, torch, torch.nn.functional as F
W = torch.randn(151936, 4096, device="cuda", dtype=torch.bfloat16)
big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
def host_ms(m, busy):
    h = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    if busy:
        for _ in range(20): big @ big  # ~30 ms of GPU work queued ahead
    t = time.perf_counter(); F.linear(h, W); dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt * 1e3
for busy in (False, True):
    new = [host_ms(m, busy) for m in range(1, 300, 7)]
    again = [host_ms(m, busy) for m in range(1, 300, 7)]
    print(f"busy={busy}: new M mean {sum(new)/len(new):.3f} ms max {max(new):.3f}; repeated M mean {sum(again)/len(again):.3f} ms max {max(again):.3f}")
h = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16); torch.cuda.synchronize()
for n in (10, 100, 1000, 3000):
    t = time.perf_counter()
    for _ in range(n): torch.add(h, 1)
    print(n, "small launches queued: host", round((time.perf_counter() - t) * 1e3, 2), "ms"); torch.cuda.synchronize()
