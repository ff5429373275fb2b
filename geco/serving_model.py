"""The code MLflow runs to load a registered geco retriever ("models from code"): it is logged
as the model's python_model next to a copy of the geco package (geco.registry.log_retriever),
so a serving host needs no installed geco. Not imported by geco itself."""

from geco.serving import set_served_model

set_served_model()
