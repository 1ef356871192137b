"""Rendered attribute families isolate one attribute: across datasets of a family, scene k differs
only in the varied attribute; inside a dataset, the fixed attributes change from scene to scene."""

import pytest
import torch

from attrspace.data.families import make_family

SIZE, VIEWS = 28, 2


def _family(attribute):
    return make_family(attribute, 2, 2, VIEWS, SIZE, seed=3, threads=1)


def test_texture_and_lighting_datasets_share_depth_per_scene_index_only():
    for attribute in ("texture", "lighting"):
        d0, d1 = _family(attribute)
        for key in ("depths", "extrinsics", "intrinsics"):
            # same scene index, other dataset: the geometry and cameras are the same draw
            assert torch.equal(d0.arrays[key], d1.arrays[key]), (attribute, key)
        # other scene index, same dataset: fresh geometry and cameras
        assert not torch.equal(d0.arrays["depths"][0], d0.arrays["depths"][1])
        assert not torch.equal(d0.arrays["extrinsics"][0], d0.arrays["extrinsics"][1])
        # and the varied attribute changes the pixels
        assert not torch.equal(d0.arrays["images"], d1.arrays["images"])


def test_geometry_datasets_share_cameras_and_camera_datasets_share_geometry():
    g0, g1 = _family("geometry")
    assert torch.equal(g0.arrays["extrinsics"], g1.arrays["extrinsics"])
    assert torch.equal(g0.arrays["intrinsics"], g1.arrays["intrinsics"])
    assert not torch.equal(g0.arrays["depths"], g1.arrays["depths"])
    assert not torch.equal(g0.arrays["extrinsics"][0], g0.arrays["extrinsics"][1])
    c0, c1 = _family("camera")
    assert not torch.equal(c0.arrays["extrinsics"], c1.arrays["extrinsics"])
    # same geometry, texture and lighting at scene k: the scene specs say so and the renders of the
    # two datasets differ only through the cameras
    for s0, s1 in zip(c0.spec.scenes, c1.spec.scenes, strict=True):
        assert (s0.geometry, s0.texture, s0.lighting) == (s1.geometry, s1.texture, s1.lighting)
    assert c0.spec.scenes[0].geometry != c0.spec.scenes[1].geometry


def test_content_streams_share_fixed_attributes_across_families_not_within():
    from attrspace.data.families import family_specs

    def specs(family, streams):
        return family_specs(family, 4, 3, VIEWS, seed=3, content_streams=streams)

    # One stream per family reproduces the default specs exactly.
    assert [s.to_dict() for s in specs("texture", 1)] == [
        s.to_dict() for s in family_specs("texture", 4, 3, VIEWS, seed=3)
    ]
    tex, geo = specs("texture", 2), specs("geometry", 2)
    for k in range(3):
        # datasets 0 and 2 draw from stream 0, dataset 1 from stream 1
        assert tex[0].scenes[k].camera == tex[2].scenes[k].camera
        assert tex[0].scenes[k].camera != tex[1].scenes[k].camera
        # the same stream in another family: the attributes neither family varies are equal
        assert (tex[1].scenes[k].camera, tex[1].scenes[k].lighting) == (
            geo[1].scenes[k].camera,
            geo[1].scenes[k].lighting,
        )
        assert tex[0].scenes[k].texture != tex[2].scenes[k].texture  # the varied attribute
    assert tex[0].scenes[0].geometry != tex[0].scenes[1].geometry  # and content moves with k
    with pytest.raises(ValueError, match="content_streams"):
        specs("texture", 0)
