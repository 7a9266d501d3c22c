"""One layer's decode attention at 32k, out of cache (10 layers' buffers in turn), 2 threads: SDPA over float32
and bfloat16 KV against Int8KV's int8 kernel path. `python docs/results/int8kv_microbench.py`."""
import torch, time
from livekv.int8kv import Int8KV
from livekv.attention import attend
torch.set_num_threads(2)
T=32768; L=10  # 10 layers' buffers, cycled: out of cache
def bench(fs, n=5):
    for f in fs: f()
    t=time.perf_counter()
    for _ in range(n):
        for f in fs: f()
    return (time.perf_counter()-t)/n/len(fs)*1e3
q = torch.randn(1,9,1,64)
for dtype in (torch.float32, torch.bfloat16):
    kv = [(torch.randn(1,3,T,64,dtype=dtype), torch.randn(1,3,T,64,dtype=dtype)) for _ in range(L)]
    print(dtype, "sdpa", round(bench([lambda k=k,v=v: attend(q.to(dtype), k, v, 0.125) for k,v in kv]),2), "ms/layer")
bufs=[]
for _ in range(L):
    b=Int8KV(1,3,64,torch.bfloat16,torch.device("cpu")); b.append(torch.randn(1,3,T,64), torch.randn(1,3,T,64)); bufs.append(b)
qb=q.bfloat16()
print("int8 kernel", round(bench([lambda b=b: b.attend(qb, 0.125) for b in bufs]),2), "ms/layer")
