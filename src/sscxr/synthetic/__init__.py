"""The project's built-in synthetic cohort (`sscxr synth`): seeded chest X-ray phantoms, lung masks
and a manifest in the layout the importers write, so that every command runs without a real data set.

Three modules, one step each:

- `phantom`: anatomy (lungs, heart, ribs, clavicles, spine, vessels) and disease (pneumonia,
  covid-19) drawn as attenuation maps in a body frame, with the lung-field mask;
- `acquisition`: how each site acquires an image (`SiteStyle`: exposure, tone curve, noise, blur,
  collimation, burned-in markers), `acquire` turning an attenuation map into a processed radiograph
  with a per-image variation calibrated on real single-hospital sets (`intensity_profile` measures it);
- `cohort`: plans the cohort (sites, classes, patients, follow-ups, splits) from a `SynthConfig`,
  renders each image through the two modules above and writes images, masks, `manifest.csv` and
  `synth_config.json` (the config and `GENERATOR_VERSION`, bumped when the pictures change).

The data pipeline (`sscxr.data`) never imports this package: a synthetic cohort is read like any
other folder with a manifest. The names below are the ones callers use; the rest stay in the modules.
"""

from __future__ import annotations

from sscxr.synthetic.acquisition import (
    PEDIATRIC_SITE,
    SITE_STYLES,
    SiteStyle,
    acquire,
    intensity_profile,
    site_style,
)
from sscxr.synthetic.cohort import (
    GENERATOR_VERSION,
    ImageJob,
    Phantom,
    SynthConfig,
    generate_cohort,
    plan_cohort,
    read_png,
    render_job,
    render_phantom,
)
from sscxr.synthetic.phantom import (
    LABELS,
    Anatomy,
    Pathology,
    pathology_map,
    render_anatomy,
    sample_anatomy,
    sample_pathology,
)

__all__ = [
    "GENERATOR_VERSION",
    "LABELS",
    "PEDIATRIC_SITE",
    "SITE_STYLES",
    "Anatomy",
    "ImageJob",
    "Pathology",
    "Phantom",
    "SiteStyle",
    "SynthConfig",
    "acquire",
    "generate_cohort",
    "intensity_profile",
    "pathology_map",
    "plan_cohort",
    "read_png",
    "render_anatomy",
    "render_job",
    "render_phantom",
    "sample_anatomy",
    "sample_pathology",
    "site_style",
]
