"""The dense CRF's parameters: those of STEGO's crf.py, which PPAP's published numbers were computed with."""

CRF_MAX_ITER = 10  # mean-field iterations: MAX_ITER in STEGO's crf.py, as in PPAP
CRF_POS_XY_STD = 1  # Gaussian (smoothness) kernel, spatial std in pixels: POS_XY_STD in STEGO
CRF_POS_W = 3  # Gaussian kernel weight: POS_W in STEGO
CRF_BI_XY_STD = 67  # bilateral (appearance) kernel, spatial std in pixels: Bi_XY_STD in STEGO
CRF_BI_RGB_STD = 3  # bilateral kernel, colour std in uint8 levels (one for all channels): Bi_RGB_STD in STEGO
CRF_BI_W = 4  # bilateral kernel weight: Bi_W in STEGO
UNARY_CLIP = 1e-5  # probabilities are clipped here before -log: pydensecrf's unary_from_softmax default
BACKENDS = ("pydensecrf", "torch")  # eval.crf_backend: the protocol's C++ CRF, and the same CRF in PyTorch
