# Copyright 2026 The mage-hf authors. MIT licence.
"""The MAGE demo Space: mage-hf's Gradio app (`mage_hf.gradio_app`), nothing else.

    MAGE_MODEL=path/or/org-name python space/app.py     # locally; the same as `mage-hf demo`

`MAGE_MODEL` names the model (a converted or trained folder, or a Hub repo id); `MAGE_CLASSIFIER` optionally adds a
classifier for the Understand tab. On Spaces, `mage-hf push --space` uploads this folder with the `mage_hf` package
beside it and sets `MAGE_MODEL`.
"""

from mage_hf.gradio_app import main

if __name__ == "__main__":
    main()
