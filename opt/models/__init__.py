from opt.models.model import OPTModel
from opt.models.sizes import MODEL_SIZES, ModelArgs, get_model_args

__all__ = ["MODEL_SIZES", "ModelArgs", "OPTModel", "get_model_args"]
