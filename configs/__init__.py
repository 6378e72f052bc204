"""The packaged configs, installed as `bihm_configs`: `bihm train --config NAME` reads NAME.yaml."""
