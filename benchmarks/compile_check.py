"""torch.compile (inductor, freezing) on the prepared EfficientNet-B0 and kEffNet-B0 16ch, 224x224 batch 16.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 .venv/bin/python benchmarks/compile_check.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, time, gpconv, statistics, sys
from gpconv.core.inference import prepare_for_inference
torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import describe_machine
print(describe_machine())
import torch._inductor.config as cfg
cfg.freezing = True
size,batch,skip=224,16,0
x=torch.randn(batch,3,size,size).contiguous(memory_format=torch.channels_last)
out={}
for name,cpg in [('base',None),('k16',16)]:
    m=prepare_for_inference(gpconv.create_model('efficientnet_b0',10,channels_per_group=cpg,skip_strides=skip))
    c=torch.compile(m)
    t=time.perf_counter()
    with torch.inference_mode(): c(x)
    print(name,'compile s', round(time.perf_counter()-t,1), flush=True)
    out[name]=c
res={k:[] for k in out}
with torch.inference_mode():
    for r in range(8):
        for k,m in out.items():
            t=time.perf_counter(); m(x); res[k].append(time.perf_counter()-t)
b=statistics.median(res['base'])
print({k:(round(statistics.median(v)*1e3,1), round(b/statistics.median(v),2)) for k,v in res.items()})
