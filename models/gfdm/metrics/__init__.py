"""Sample-quality metrics, one module per metric:

- :mod:`.vendi`: the pixel Vendi score VS_p;
- :mod:`.fid`: FID statistics (``FeatureStats``, ``frechet_distance``, reference statistics, ``fid``) and the
  choice of feature extractor;
- :mod:`.inception`: the FID Inception-v3, its two input conventions and the loading of weights (fid-helper's
  real weights or a file; published FID);
- :mod:`.offline`: the offline feature extractor (a classifier trained here, cached; NOT a published FID);
- :mod:`.common`: the 8-bit pixels every metric sees and the cache folder.
"""
from .common import default_cache_dir, quantize
from .fid import (
                  INCEPTION_ENV,
                  FeatureStats,
                  check_feature_args,
                  feature_extractor,
                  fid,
                  frechet_distance,
                  reference_stats,
)
from .inception import CONVENTIONS, FID_HELPER, InceptionFeatures, InceptionV3, fid_helper_weights, resize_tf1
from .offline import OfflineFeatureNet, OfflineFeatures
from .vendi import pixel_vendi_score

__all__ = ["pixel_vendi_score", "frechet_distance", "FeatureStats", "InceptionV3", "InceptionFeatures",
           "OfflineFeatureNet", "OfflineFeatures", "feature_extractor", "reference_stats", "fid", "quantize",
           "default_cache_dir", "INCEPTION_ENV", "check_feature_args", "CONVENTIONS", "FID_HELPER",
           "fid_helper_weights", "resize_tf1"]
