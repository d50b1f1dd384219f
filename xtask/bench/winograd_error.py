"""The error of Winograd F(2x2, 3x3) and F(4x4, 3x3) in f32 against an exact (f64) 3x3
convolution of one 1280-channel layer (the UNet's deepest), as a fraction of the largest output,
beside a direct f32 convolution: the measurement behind not building F(4x4, 3x3)
(docs/performance.md).

    cargo xtask py bench/winograd_error.py
"""
import numpy as np
rng=np.random.default_rng(0)
def f2():
    BT=np.array([[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]],dtype=np.float64)
    G=np.array([[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]])
    AT=np.array([[1,1,1,0],[0,1,-1,-1]])
    return BT,G,AT,2
def f4():
    BT=np.array([[4,0,-5,0,1,0],[0,-4,-4,1,1,0],[0,4,-4,-1,1,0],[0,-2,-1,2,1,0],[0,2,-1,-2,1,0],[0,4,0,-5,0,1]],dtype=np.float64)
    G=np.array([[1/4,0,0],[-1/6,-1/6,-1/6],[-1/6,1/6,-1/6],[1/24,1/12,1/6],[1/24,-1/12,1/6],[0,0,1]])
    AT=np.array([[1,1,1,1,1,0],[0,1,-1,2,-2,0],[0,1,1,4,4,0],[0,1,-1,8,-8,1]],dtype=np.float64)
    return BT,G,AT,4
C=1280; K=8
x=rng.standard_normal((C,12,12)).astype(np.float32)
w=(rng.standard_normal((K,C,3,3))/np.sqrt(9*C)).astype(np.float32)
# exact conv (valid) in f64
xd=x.astype(np.float64); wd=w.astype(np.float64)
H=10
ref=np.zeros((K,H,H))
for i in range(3):
    for j in range(3):
        ref+=np.einsum('kc,chw->khw',wd[:,:,i,j],xd[:,i:i+H,j:j+H])
for name,(BT,G,AT,m) in [('F2',f2()),('F4',f4())]:
    BT32=BT.astype(np.float32);G32=G.astype(np.float32);AT32=AT.astype(np.float32)
    a=m+2
    U=np.einsum('ij,kcjl,ml->kcim',G32,w,G32).astype(np.float32)
    out=np.zeros((K,H,H),dtype=np.float32); n=0
    for ty in range(0,H-m+1,m):
        for tx in range(0,H-m+1,m):
            d=x[:,ty:ty+a,tx:tx+a]
            V=np.einsum('ij,cjl,ml->cim',BT32,d,BT32).astype(np.float32)
            M=np.einsum('kcij,cij->kij',U,V).astype(np.float32)
            Y=np.einsum('ij,kjl,ml->kim',AT32,M,AT32).astype(np.float32)
            out[:,ty:ty+m,tx:tx+m]=Y
    cov=(H//m)*m
    err=np.abs(out[:,:cov,:cov]-ref[:,:cov,:cov]).max()/np.abs(ref[:,:cov,:cov]).max()
    print(name, 'max err / max |ref|', err)
# direct f32
d32=np.zeros((K,H,H),dtype=np.float32)
for i in range(3):
    for j in range(3):
        d32+=np.einsum('kc,chw->khw',w[:,:,i,j],x[:,i:i+H,j:j+H]).astype(np.float32)
print('direct f32', np.abs(d32-ref).max()/np.abs(ref).max())
