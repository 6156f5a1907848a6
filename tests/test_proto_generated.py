"""The committed protobuf code is exactly what the schema generates."""

from exod.proto import generate


def test_regenerating_changes_nothing(tmp_path):
    written = generate.generate(tmp_path)
    assert [p.name for p in written] == list(generate.GENERATED)
    for path in written:
        committed = generate.PROTO_DIR / path.name
        assert committed.read_bytes() == path.read_bytes(), f"{path.name} is stale: run python -m exod.proto.generate"


def test_generated_module_imports_under_the_namespace():
    from exod.proto import exod_pb2

    assert exod_pb2.DESCRIPTOR.package == "exod.v1"
    assert exod_pb2.DESCRIPTOR.name == "exod/proto/exod.proto"
