#!/usr/bin/env python3
"""Compare evbridge's proto/ copies of the Bazel BEP and BES schemas with an
upstream checkout and print every difference on the wire-relevant surface.

usage: scripts/check_protos.py UPSTREAM_DIR [--ours DIR] [--keep-temp]

UPSTREAM_DIR holds upstream .proto files in any layout: Bazel's tree
(src/main/protobuf/..., src/main/java/...), googleapis' google/devtools/...,
a flat directory, or a vendored copy such as buildbuddy's proto/. Files are
found by base name, so only the names matter. Upstream imports are rewritten
to point at the copies found; google/api annotations are used when the
upstream directory has google/api/*.proto and stripped otherwise (they are
not on the wire and proto/ has none).

Compared, for every message, enum, extension and service of the Bazel and
Build Event Service packages: full names; per field name, number, type,
type_name, label, proto3_optional, oneof membership, json_name, default and
the deprecated flag; nested types; enum value names, numbers and deprecated
flags; reserved ranges and names; map entries; service methods.

Needs only grpcio-tools (and the protobuf runtime it pulls in):
    python3 -m venv /tmp/protovenv && /tmp/protovenv/bin/pip install grpcio-tools
    /tmp/protovenv/bin/python scripts/check_protos.py /tmp/upstream-protos
Exit status: 0 when nothing differs, 1 when something does, 2 on errors.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import grpc_tools
    from google.protobuf import descriptor_pb2
except ImportError:
    sys.exit("check_protos.py needs grpcio-tools: pip install grpcio-tools")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Entry points of the schemas; everything they import is followed.
UPSTREAM_ROOTS = [
    "build_event_stream.proto",
    "build_events.proto",
    "build_status.proto",
    "publish_build_event.proto",
]
# Packages whose contents are compared.
PACKAGES = {
    "build_event_stream",
    "command_line",
    "failure_details",
    "blaze",
    "blaze.invocation_policy",
    "blaze.strategy_policy",
    "options",
    "devtools.build.lib.packages.metrics",
    "devtools_blaze_proto",
    "google.devtools.build.v1",
}
# Our side: every file below these folders of proto/.
OUR_DIRS = ["bazel", os.path.join("google", "devtools", "build", "v1")]

IMPORT_RE = re.compile(r'^(\s*import\s+(?:public\s+|weak\s+)?")([^"]+)(";)', re.M)


def well_known_include():
    return os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")


def find_by_name(top):
    """Base name -> path of every .proto below top (first hit wins, shortest path)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".proto"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, top)
                if name not in found or len(rel) < len(found[name][1]):
                    found[name] = (path, rel)
    return found


def strip_google_api(text):
    """Drop google.api imports and annotations (HTTP bindings, field behavior)."""
    text = re.sub(r'^\s*import\s+"google/api/[^"]+";\s*$\n?', "", text, flags=re.M)
    text = re.sub(r"\s*\[\s*\(google\.api\.[a-z_]+\)\s*=\s*[A-Z_]+\s*\]", "", text)
    out, i = [], 0
    pattern = re.compile(r"option\s*\(google\.api\.[a-z_]+\)")
    while True:
        m = pattern.search(text, i)
        if not m:
            out.append(text[i:])
            break
        out.append(text[i:m.start()])
        depth, j, in_str = 0, m.end(), None
        while j < len(text):
            c = text[j]
            if in_str:
                if c == "\\":
                    j += 1
                elif c == in_str:
                    in_str = None
            elif c in "\"'":
                in_str = c
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            elif c == ";" and depth == 0:
                break
            j += 1
        i = j + 1
    return "".join(out)


def stage_upstream(upstream, tmp):
    """Copy the upstream closure into tmp/ under flat names; return file list."""
    by_name = find_by_name(upstream)
    have_google_api = all(
        n in by_name for n in ("annotations.proto", "http.proto", "client.proto", "field_behavior.proto")
    )
    missing = [n for n in UPSTREAM_ROOTS if n not in by_name]
    if missing:
        sys.exit("check_protos.py: not found under %s: %s" % (upstream, ", ".join(missing)))
    staged, queue, placed = [], list(UPSTREAM_ROOTS), {}
    while queue:
        name = queue.pop()
        if name in placed:
            continue
        src, _ = by_name[name]
        with open(src, encoding="utf-8") as f:
            text = f.read()
        google_api = name in ("annotations.proto", "http.proto", "client.proto",
                              "field_behavior.proto", "launch_stage.proto")
        dest_rel = os.path.join("google", "api", name) if google_api else name
        if not have_google_api:
            text = strip_google_api(text)

        def rewrite(m):
            imp = m.group(2)
            if imp.startswith("google/protobuf/"):
                return m.group(0)
            base = os.path.basename(imp)
            if imp.startswith("google/api/"):
                queue.append(base)
                return m.group(0)
            if base not in by_name:
                sys.exit("check_protos.py: %s imports %s, which is not under %s" % (name, imp, upstream))
            queue.append(base)
            return m.group(1) + base + m.group(3)

        text = IMPORT_RE.sub(rewrite, text)
        dest = os.path.join(tmp, dest_rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "w", encoding="utf-8") as f:
            f.write(text)
        placed[name] = dest_rel
        staged.append(dest_rel)
    return sorted(staged)


def compile_set(include_dirs, files, out):
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "--include_imports",
           "--descriptor_set_out=" + out]
    cmd += ["-I" + d for d in include_dirs] + ["-I" + well_known_include()] + files
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        sys.exit("check_protos.py: protoc failed: %s" % " ".join(cmd))
    fds = descriptor_pb2.FileDescriptorSet()
    with open(out, "rb") as f:
        fds.ParseFromString(f.read())
    return fds


def index(fds):
    """Full name -> (kind, descriptor proto, file proto) for the compared packages."""
    items = {}

    def walk_msg(prefix, msg, fdp):
        full = prefix + "." + msg.name
        items[full] = ("message", msg, fdp)
        for nested in msg.nested_type:
            walk_msg(full, nested, fdp)
        for enum in msg.enum_type:
            items[full + "." + enum.name] = ("enum", enum, fdp)
        for ext in msg.extension:
            items[full + "." + ext.name] = ("extension", ext, fdp)

    for fdp in fds.file:
        if fdp.package not in PACKAGES:
            continue
        prefix = "." + fdp.package
        for msg in fdp.message_type:
            walk_msg(prefix, msg, fdp)
        for enum in fdp.enum_type:
            items[prefix + "." + enum.name] = ("enum", enum, fdp)
        for ext in fdp.extension:
            items[prefix + "." + ext.name] = ("extension", ext, fdp)
        for svc in fdp.service:
            items[prefix + "." + svc.name] = ("service", svc, fdp)
    return items


TYPE_NAMES = {v: k for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}
LABEL_NAMES = {v: k for k, v in descriptor_pb2.FieldDescriptorProto.Label.items()}


def field_facts(field, msg):
    oneof = None
    if field.HasField("oneof_index"):
        oneof = msg.oneof_decl[field.oneof_index].name if msg is not None else field.oneof_index
    return {
        "number": field.number,
        "type": TYPE_NAMES.get(field.type, field.type),
        "type_name": field.type_name,
        "label": LABEL_NAMES.get(field.label, field.label),
        "proto3_optional": field.proto3_optional,
        "oneof": oneof,
        "json_name": field.json_name,
        "default": field.default_value if field.HasField("default_value") else None,
        "deprecated": field.options.deprecated,
        "extendee": field.extendee or None,
    }


def ranges(rs, inclusive_end):
    return sorted((r.start, r.end if inclusive_end else r.end - 1) for r in rs)


def compare_fields(where, up_fields, our_fields, up_msg, our_msg, diffs):
    up = {f.name: f for f in up_fields}
    ours = {f.name: f for f in our_fields}
    for name in up:
        if name not in ours:
            f = up[name]
            diffs.append("%s: field %s = %d missing in ours" % (where, name, f.number))
    for name in ours:
        if name not in up:
            diffs.append("%s: field %s = %d not in upstream" % (where, name, ours[name].number))
    for name in up:
        if name in ours:
            a, b = field_facts(up[name], up_msg), field_facts(ours[name], our_msg)
            for key in a:
                if a[key] != b[key]:
                    diffs.append("%s.%s: %s upstream %r, ours %r" % (where, name, key, a[key], b[key]))


def compare(up_items, our_items):
    diffs, notes = [], []
    for name in sorted(set(up_items) | set(our_items)):
        if name not in our_items:
            diffs.append("%s: %s missing in ours" % (name[1:], up_items[name][0]))
            continue
        if name not in up_items:
            diffs.append("%s: %s not in upstream" % (name[1:], our_items[name][0]))
            continue
        (ukind, up, ufile), (okind, ours, ofile) = up_items[name], our_items[name]
        where = name[1:]
        if ukind != okind:
            diffs.append("%s: upstream %s, ours %s" % (where, ukind, okind))
            continue
        usyn, osyn = ufile.syntax or "proto2", ofile.syntax or "proto2"
        if ukind in ("message", "enum") and usyn != osyn:
            if usyn == "editions" and osyn == "proto3" and ukind == "enum":
                notes.append("%s: upstream file uses editions, ours proto3 (open enum either way)" % where)
            else:
                diffs.append("%s: syntax upstream %s, ours %s" % (where, usyn, osyn))
        if ukind == "message":
            if up.options.map_entry != ours.options.map_entry:
                diffs.append("%s: map_entry upstream %s, ours %s" % (where, up.options.map_entry, ours.options.map_entry))
            compare_fields(where, up.field, ours.field, up, ours, diffs)
            uo = [o.name for o in up.oneof_decl]
            oo = [o.name for o in ours.oneof_decl]
            if sorted(uo) != sorted(oo):
                diffs.append("%s: oneofs upstream %s, ours %s" % (where, uo, oo))
            un, on = sorted(n.name for n in up.nested_type), sorted(n.name for n in ours.nested_type)
            if un != on:
                diffs.append("%s: nested messages upstream %s, ours %s" % (where, un, on))
            ue, oe = sorted(e.name for e in up.enum_type), sorted(e.name for e in ours.enum_type)
            if ue != oe:
                diffs.append("%s: nested enums upstream %s, ours %s" % (where, ue, oe))
            ur, orr = ranges(up.reserved_range, False), ranges(ours.reserved_range, False)
            if ur != orr:
                diffs.append("%s: reserved ranges upstream %s, ours %s" % (where, ur, orr))
            if sorted(up.reserved_name) != sorted(ours.reserved_name):
                diffs.append("%s: reserved names upstream %s, ours %s" % (where, sorted(up.reserved_name), sorted(ours.reserved_name)))
            ux, ox = ranges(up.extension_range, False), ranges(ours.extension_range, False)
            if ux != ox:
                diffs.append("%s: extension ranges upstream %s, ours %s" % (where, ux, ox))
        elif ukind == "enum":
            uv = {v.name: (v.number, v.options.deprecated) for v in up.value}
            ov = {v.name: (v.number, v.options.deprecated) for v in ours.value}
            for v in sorted(set(uv) | set(ov)):
                if v not in ov:
                    diffs.append("%s: value %s = %d missing in ours" % (where, v, uv[v][0]))
                elif v not in uv:
                    diffs.append("%s: value %s = %d not in upstream" % (where, v, ov[v][0]))
                elif uv[v] != ov[v]:
                    diffs.append("%s.%s: (number, deprecated) upstream %s, ours %s" % (where, v, uv[v], ov[v]))
            if [v.name for v in up.value][:1] != [v.name for v in ours.value][:1]:
                diffs.append("%s: first value upstream %s, ours %s" % (where, up.value[0].name, ours.value[0].name))
            ur, orr = ranges(up.reserved_range, True), ranges(ours.reserved_range, True)
            if ur != orr:
                diffs.append("%s: reserved ranges upstream %s, ours %s" % (where, ur, orr))
            if sorted(up.reserved_name) != sorted(ours.reserved_name):
                diffs.append("%s: reserved names upstream %s, ours %s" % (where, sorted(up.reserved_name), sorted(ours.reserved_name)))
        elif ukind == "extension":
            compare_fields(where.rsplit(".", 1)[0], [up], [ours], None, None, diffs)
        elif ukind == "service":
            um = {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in up.method}
            om = {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in ours.method}
            for m in sorted(set(um) | set(om)):
                if um.get(m) != om.get(m):
                    diffs.append("%s.%s: (input, output, client_streaming, server_streaming) upstream %s, ours %s" % (where, m, um.get(m), om.get(m)))
    return diffs, notes


# Differences made on purpose: what upstream retired (reserved) but older
# Bazels still write, kept so their events decode with names instead of
# arriving as unknown fields or bare numbers. Reported as notes.
KEPT_FOR_OLDER_BAZEL = {
    "blaze.invocation_policy.SetValue: field overridable = 2 not in upstream",
    "blaze.invocation_policy.SetValue: field append = 3 not in upstream",
    "blaze.invocation_policy.SetValue: reserved ranges upstream [(2, 2), (3, 3)], ours []",
    "build_event_stream.ActionExecuted: field action_metadata_logs = 10 not in upstream",
    "build_event_stream.ActionExecuted: reserved ranges upstream [(10, 10)], ours []",
    "options.OptionMetadataTag: value EXPLICIT_IN_OUTPUT_PATH = 6 not in upstream",
    "options.OptionMetadataTag: value IMMUTABLE = 7 not in upstream",
    "options.OptionMetadataTag: value TRIGGERED_BY_ALL_INCOMPATIBLE_CHANGES = 5 not in upstream",
    "options.OptionMetadataTag: reserved ranges upstream [(5, 5), (6, 6), (7, 7)], ours []",
    "options.OptionMetadataTag: reserved names upstream "
    "['EXPLICIT_IN_OUTPUT_PATH', 'IMMUTABLE', 'TRIGGERED_BY_ALL_INCOMPATIBLE_CHANGES'], ours []",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("upstream", help="directory holding upstream .proto files (any layout)")
    ap.add_argument("--ours", default=os.path.join(ROOT, "proto"), help="our proto root (default: proto/)")
    ap.add_argument("--keep-temp", action="store_true", help="keep the staged upstream tree and descriptor sets")
    args = ap.parse_args()
    if not os.path.isdir(args.upstream):
        sys.exit("check_protos.py: %s is not a directory" % args.upstream)

    tmp = tempfile.mkdtemp(prefix="check_protos.")
    try:
        staged = os.path.join(tmp, "upstream")
        os.makedirs(staged)
        up_files = stage_upstream(args.upstream, staged)
        up_fds = compile_set([staged], [os.path.join(staged, f) for f in up_files], os.path.join(tmp, "upstream.pb"))

        our_files = []
        for d in OUR_DIRS:
            base = os.path.join(args.ours, d)
            for name in sorted(os.listdir(base)):
                if name.endswith(".proto"):
                    our_files.append(os.path.join(base, name))
        our_fds = compile_set([args.ours], our_files, os.path.join(tmp, "ours.pb"))

        up_items, our_items = index(up_fds), index(our_fds)
        diffs, notes = compare(up_items, our_items)
        notes += ["kept for older Bazels: " + d for d in diffs if d in KEPT_FOR_OLDER_BAZEL]
        diffs = [d for d in diffs if d not in KEPT_FOR_OLDER_BAZEL]
        for n in notes:
            print("note: " + n)
        for d in diffs:
            print("DIFF: " + d)
        print("%d upstream definitions, %d ours, %d difference(s)" % (len(up_items), len(our_items), len(diffs)))
        return 1 if diffs else 0
    finally:
        if args.keep_temp:
            print("kept " + tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
