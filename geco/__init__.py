"""geco: GECo complementary-item retrieval (CIGM template generator + ResNet-18 retriever).

Library code: pure PyTorch and data handling. Ray and MLflow are imported only inside
`ray_jobs/` or lazily inside functions, never at module level here.
"""

__version__ = "0.1.0"
