//! The daemon's state on the main context: named nodes, iothreads and exports, and the
//! operations the command line and QMP perform on them. Errors carry QMP's error classes and
//! QSD's wording.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ringblk_blkgraph::file::{FileNode, FileOptions};
use ringblk_blkgraph::null::{NullCo, NullOptions};
use ringblk_blkgraph::{BackendHandle, BlockError, Node, Request};
use ringblk_mirror::{JobStatus, Mirror};
use ringblk_nbd::{ClientOptions, NbdClient, NbdServer};
use ringblk_ring::{Context, IoThread};
use ringblk_virtio::{Export, ExportConfig};
use serde_json::{Value, json};

use crate::options::{
    BlockdevDriver, BlockdevOptions, ExportKind, ExportOptions, NbdServerOptions, ObjectOptions,
    ObjectProperties, SocketAddress,
};

/// A failed operation, with the QMP error class it is reported with.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// QMP `GenericError`.
    #[error("{0}")]
    Generic(String),
    /// QMP `DeviceNotFound`.
    #[error("{0}")]
    DeviceNotFound(String),
}

impl DaemonError {
    /// The QMP error class.
    pub fn class(&self) -> &'static str {
        match self {
            DaemonError::Generic(_) => "GenericError",
            DaemonError::DeviceNotFound(_) => "DeviceNotFound",
        }
    }
}

fn generic(message: impl Into<String>) -> DaemonError {
    DaemonError::Generic(message.into())
}

impl NamedNode {
    /// What QEMU calls the node's filename: the image's path, or for a node without one the
    /// `json:` pseudo-protocol form of its options.
    fn filename(&self) -> String {
        match &self.options.driver {
            BlockdevDriver::File(file) => file.filename.display().to_string(),
            BlockdevDriver::NullCo(null) => {
                // The options QEMU keeps, in QSD's member order.
                let zeroes = if null.read_zeroes {
                    "\"read-zeroes\": true, "
                } else {
                    ""
                };
                format!(
                    "json:{{{zeroes}\"driver\": \"null-co\", \"size\": {}}}",
                    null.size
                )
            }
            // QEMU's URI form.
            BlockdevDriver::Nbd(nbd) => match &nbd.server {
                ringblk_nbd::Address::Unix(path) => {
                    format!("nbd+unix:///{}?socket={}", nbd.export, path.display())
                }
                ringblk_nbd::Address::Inet { host, port } => {
                    format!("nbd://{host}:{port}/{}", nbd.export)
                }
            },
        }
    }

    /// Bytes the image occupies on its file system (QEMU's `actual-size`).
    fn actual_size(&self) -> u64 {
        match &self.options.driver {
            BlockdevDriver::File(file) => std::fs::metadata(&file.filename)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0),
            BlockdevDriver::NullCo(_) | BlockdevDriver::Nbd(_) => 0,
        }
    }

    /// One `BlockDeviceInfo` of `query-named-block-nodes`.
    fn info(&self) -> Value {
        let node = &self.node;
        let filename = self.filename();
        let mut image = json!({
            "filename": filename,
            "format": node.driver_name(),
            // QEMU counts sizes in 512-byte sectors: a partial last sector is a whole one.
            "virtual-size": node.size().next_multiple_of(512),
            "actual-size": self.actual_size(),
        });
        if let BlockdevDriver::File(_) = self.options.driver {
            image["dirty-flag"] = json!(false);
            image["format-specific"] = json!({ "type": "file", "data": {} });
        }
        json!({
            "node-name": node.name(),
            "drv": node.driver_name(),
            "ro": node.read_only(),
            "active": true,
            "backing_file_depth": 0,
            "file": filename,
            "image": image,
            "encrypted": false,
            "detect_zeroes": "off",
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "write_threshold": node.write_threshold(),
            "cache": {
                "writeback": true,
                "direct": self.options.cache.direct,
                "no-flush": self.options.cache.no_flush,
            },
        })
    }
}

/// The graph `x-debug-query-block-graph` returns, built vertex by vertex.
#[derive(Default)]
struct BlockGraph {
    vertices: Vec<Value>,
    edges: Vec<Value>,
    /// The block nodes among the vertices, by id.
    nodes: Vec<(Node, u64)>,
}

impl BlockGraph {
    fn vertex(&mut self, name: &str, kind: &str) -> u64 {
        let id = self.vertices.len() as u64 + 1;
        self.vertices
            .push(json!({ "id": id, "name": name, "type": kind }));
        id
    }

    /// The vertex of `node`, added with its children (and their `backing` edges) the first
    /// time it is seen.
    fn node(&mut self, node: &Node) -> u64 {
        if let Some((_, id)) = self.nodes.iter().find(|(n, _)| n.same(node)) {
            return *id;
        }
        let id = self.vertex(node.name(), "block-driver");
        self.nodes.push((node.clone(), id));
        for child in node.children() {
            let child = self.node(&child);
            let shared = ["write-unchanged", "write", "consistent-read"];
            self.edge("backing", id, child, &["write", "consistent-read"], &shared);
        }
        id
    }

    /// The vertex with an edge to vertex `child`, if any.
    fn parent_of(&self, child: u64) -> Option<u64> {
        self.edges
            .iter()
            .find(|e| e["child"] == child && e["name"] == "backing")
            .and_then(|e| e["parent"].as_u64())
    }

    fn edge(&mut self, name: &str, parent: u64, child: u64, perm: &[&str], shared: &[&str]) {
        self.edges.push(json!({
            "name": name, "parent": parent, "child": child, "perm": perm, "shared-perm": shared,
        }));
    }
}

/// The side of a mirror job a node is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobRole {
    Source,
    Target,
}

/// A node added with `--blockdev` / `blockdev-add`, with the options it was opened with.
struct NamedNode {
    node: Node,
    options: BlockdevOptions,
}

struct ExportEntry {
    served: Served,
    writable: bool,
    iothreads: Vec<String>,
}

/// How an export serves its node.
enum Served {
    VhostUserBlk {
        export: Export,
        path: PathBuf,
    },
    /// An export of the NBD server, under `name`.
    Nbd {
        name: String,
        handle: BackendHandle,
    },
}

impl ExportEntry {
    /// The node the export serves now (it changes at a mirror's pivot).
    fn root(&self) -> Node {
        match &self.served {
            Served::VhostUserBlk { export, .. } => export.handle().root(),
            Served::Nbd { handle, .. } => handle.root(),
        }
    }

    fn type_name(&self) -> &'static str {
        match &self.served {
            Served::VhostUserBlk { .. } => "vhost-user-blk",
            Served::Nbd { .. } => "nbd",
        }
    }
}

/// Everything the daemon serves. Lives on the main context.
pub struct Daemon {
    jobs: BTreeMap<String, Mirror>,
    nodes: BTreeMap<String, NamedNode>,
    iothreads: BTreeMap<String, IoThread>,
    exports: BTreeMap<String, ExportEntry>,
    nbd_server: Option<NbdServer>,
}

impl Daemon {
    /// An empty daemon on the current (main) context.
    pub fn new() -> Daemon {
        Daemon {
            jobs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            iothreads: BTreeMap::new(),
            exports: BTreeMap::new(),
            nbd_server: None,
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Result<&Node, DaemonError> {
        self.nodes.get(name).map(|n| &n.node).ok_or_else(|| {
            DaemonError::DeviceNotFound(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
    }

    /// Keeps a started job under its id.
    pub fn add_job(&mut self, job: Mirror) {
        self.jobs.insert(job.id().to_owned(), job);
    }

    /// The job `id`.
    pub fn job(&self, id: &str) -> Result<&Mirror, DaemonError> {
        self.jobs
            .get(id)
            .ok_or_else(|| generic(format!("Job '{id}' not found")))
    }

    /// Every job, by id.
    pub fn jobs(&self) -> impl Iterator<Item = &Mirror> {
        self.jobs.values()
    }

    /// Which side of a job that has not concluded `node` is, if any: such a job reads or
    /// writes it, so it is neither deleted nor given to another job.
    pub fn job_role(&self, node: &Node) -> Option<JobRole> {
        let live = |job: &&Mirror| !matches!(job.status(), JobStatus::Concluded | JobStatus::Null);
        self.jobs.values().filter(live).find_map(|job| {
            if job.source().same(node) {
                Some(JobRole::Source)
            } else if job.target().same(node) {
                Some(JobRole::Target)
            } else {
                None
            }
        })
    }

    /// Forgets the jobs that reached NULL (dismissed).
    pub fn forget_finished_jobs(&mut self) {
        self.jobs.retain(|_, job| job.status() != JobStatus::Null);
    }

    /// `--blockdev` / `blockdev-add`.
    pub fn add_blockdev(&mut self, options: &BlockdevOptions) -> Result<(), DaemonError> {
        let name = &options.node_name;
        if self.nodes.contains_key(name) {
            return Err(generic(format!("Duplicate nodes with node-name='{name}'")));
        }
        let node = match &options.driver {
            BlockdevDriver::File(file) => {
                let open = FileOptions {
                    filename: file.filename.clone(),
                    read_only: options.read_only,
                    direct: options.cache.direct,
                };
                Node::new(
                    name.clone(),
                    FileNode::open(&open).map_err(|e| generic(e.to_string()))?,
                )
            }
            BlockdevDriver::NullCo(null) => {
                let null = NullOptions {
                    size: null.size,
                    read_zeroes: null.read_zeroes,
                    latency: Duration::from_nanos(null.latency_ns),
                };
                Node::new(name.clone(), NullCo::new(null))
            }
            BlockdevDriver::Nbd(nbd) => {
                let client = ClientOptions {
                    server: nbd.server.clone(),
                    export: nbd.export.clone(),
                    open_timeout: Duration::from_secs(nbd.open_timeout.into()),
                    read_only: options.read_only,
                };
                let driver = NbdClient::connect(&client).map_err(|e| generic(e.to_string()))?;
                Node::new(name.clone(), driver)
            }
        };
        let options = options.clone();
        self.nodes.insert(name.clone(), NamedNode { node, options });
        Ok(())
    }

    /// `blockdev-del`.
    pub fn del_blockdev(&mut self, name: &str) -> Result<(), DaemonError> {
        let node = self
            .nodes
            .get(name)
            .map(|n| &n.node)
            .ok_or_else(|| generic(format!("Failed to find node with node-name='{name}'")))?;
        match self.job_role(node) {
            Some(JobRole::Source) => {
                return Err(generic(format!(
                    "Node '{name}' is busy: block device is in use by block job: mirror"
                )));
            }
            Some(JobRole::Target) => return Err(generic(format!("Node {name} is in use"))),
            None => {}
        }
        if let Some(e) = self.exports.iter().find(|(_, e)| e.root().same(node)) {
            return Err(generic(format!(
                "Node '{name}' is busy: block device is in use by block export '{}'",
                e.0
            )));
        }
        if node.has_users() {
            return Err(generic(format!("Node '{name}' is busy: it is in use")));
        }
        self.nodes.remove(name);
        Ok(())
    }

    /// `block_resize` of node `name` (which exists): refused while a job uses it; then every
    /// export serving the node tells its frontend the new capacity.
    pub fn resize_node(&mut self, name: &str, size: u64) -> Result<(), DaemonError> {
        let node = self.node(name)?.clone();
        if self.job_role(&node).is_some() {
            return Err(generic(format!(
                "Node '{name}' is busy: block device is in use by block job: mirror"
            )));
        }
        node.truncate(size).map_err(|e| match e {
            BlockError::ReadOnly => generic("Image is read-only"),
            BlockError::NotSupported => generic("Image format driver does not support resize"),
            BlockError::Io(e) => generic(e.to_string()),
            other => generic(other.to_string()),
        })?;
        for entry in self.exports.values() {
            // NBD clients learn a new size when they reconnect.
            if let Served::VhostUserBlk { export, .. } = &entry.served
                && export.handle().root().same(&node)
            {
                export.capacity_changed();
            }
        }
        Ok(())
    }

    /// `--object iothread` / `object-add`.
    pub fn add_object(&mut self, options: &ObjectOptions) -> Result<(), DaemonError> {
        let ObjectProperties::Iothread(props) = &options.properties;
        if self.iothreads.contains_key(&options.id) {
            return Err(generic(format!(
                "attempt to add duplicate property '{}' to object (type 'container')",
                options.id
            )));
        }
        let thread = IoThread::spawn(&options.id, Duration::from_nanos(props.poll_max_ns))
            .map_err(|e| generic(format!("iothread '{}': {e}", options.id)))?;
        self.iothreads.insert(options.id.clone(), thread);
        Ok(())
    }

    /// `object-del`: stops an iothread. Refused while an export runs on it: QSD keeps a deleted
    /// iothread alive for its users, ringblk would stop the thread under the export.
    pub fn del_object(&mut self, id: &str) -> Result<(), DaemonError> {
        if !self.iothreads.contains_key(id) {
            return Err(generic(format!("object '{id}' not found")));
        }
        if let Some((export, _)) = self
            .exports
            .iter()
            .find(|(_, e)| e.iothreads.iter().any(|t| t == id))
        {
            return Err(generic(format!(
                "object '{id}' is in use by block export '{export}'"
            )));
        }
        self.iothreads.remove(id);
        Ok(())
    }

    /// `--export` / `block-export-add`.
    pub fn add_export(&mut self, options: &ExportOptions) -> Result<(), DaemonError> {
        if self.exports.contains_key(&options.id) {
            return Err(generic(format!(
                "Block export id '{}' is already in use",
                options.id
            )));
        }
        let node = self.node(&options.node_name)?.clone();
        // Queue i is served by iothread i % n (the export spreads them); none: the main context.
        let rings = if options.iothread.is_empty() {
            vec![Context::current().remote()]
        } else {
            options
                .iothread
                .iter()
                .map(|id| {
                    let thread = self.iothreads.get(id);
                    thread
                        .map(|t| t.remote().clone())
                        .ok_or_else(|| generic(format!("iothread \"{id}\" not found")))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let served = match &options.kind {
            ExportKind::VhostUserBlk(vub) => {
                Self::start_vhost_user_blk(options, vub, BackendHandle::new(&node), rings)?
            }
            ExportKind::Nbd(nbd) => {
                let server = self
                    .nbd_server
                    .as_ref()
                    .ok_or_else(|| generic("NBD server not running"))?;
                let name = nbd.name.clone().unwrap_or_else(|| node.name().to_owned());
                let config = ringblk_nbd::ExportConfig {
                    name: name.clone(),
                    description: nbd.description.clone(),
                    writable: options.writable,
                };
                let handle = BackendHandle::new(&node);
                server
                    .add_export(config, handle.clone(), rings[0].clone())
                    .map_err(generic)?;
                Served::Nbd { name, handle }
            }
        };
        let entry = ExportEntry {
            served,
            writable: options.writable,
            iothreads: options.iothread.clone(),
        };
        self.exports.insert(options.id.clone(), entry);
        Ok(())
    }

    fn start_vhost_user_blk(
        options: &ExportOptions,
        vub: &crate::options::BlockExportOptionsVhostUserBlk,
        handle: BackendHandle,
        rings: Vec<ringblk_ring::Remote>,
    ) -> Result<Served, DaemonError> {
        let SocketAddress::Unix(unix) = &vub.addr;
        let logical_block_size = u32::try_from(vub.logical_block_size)
            .map_err(|_| generic("logical-block-size is too large"))?;
        let config = ExportConfig {
            id: options.id.clone(),
            path: unix.path.clone(),
            writable: options.writable,
            num_queues: vub.num_queues,
            logical_block_size,
        };
        let export = Export::start(&config, handle, rings).map_err(|e| generic(e.to_string()))?;
        Ok(Served::VhostUserBlk {
            export,
            path: unix.path.clone(),
        })
    }

    /// `block-export-del`: disconnects the frontend (its in-flight requests complete first).
    pub fn del_export(&mut self, id: &str) -> Result<(), DaemonError> {
        let entry = self
            .exports
            .remove(id)
            .ok_or_else(|| generic(format!("Export '{id}' is not found")))?;
        match entry.served {
            Served::VhostUserBlk { export, path } => export.stop(&path),
            Served::Nbd { name, .. } => {
                if let Some(server) = &self.nbd_server {
                    server.remove_export(&name);
                }
            }
        }
        Ok(())
    }

    /// `--nbd-server` / `nbd-server-start`.
    pub fn nbd_server_start(&mut self, options: &NbdServerOptions) -> Result<(), DaemonError> {
        if self.nbd_server.is_some() {
            return Err(generic("NBD server already running"));
        }
        let max_connections = usize::try_from(options.max_connections).unwrap_or(usize::MAX);
        let server = NbdServer::start(&options.addr, max_connections)
            .map_err(|e| generic(format!("Failed to bind socket to {}: {e}", options.addr)))?;
        self.nbd_server = Some(server);
        Ok(())
    }

    /// `nbd-server-stop`: every NBD export goes away with the server, as in QEMU. Returns the
    /// ids of those exports.
    pub fn nbd_server_stop(&mut self) -> Result<Vec<String>, DaemonError> {
        if self.nbd_server.is_none() {
            return Err(generic("NBD server not running"));
        }
        let ids: Vec<String> = self
            .exports
            .iter()
            .filter(|(_, e)| matches!(e.served, Served::Nbd { .. }))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.del_export(id)?;
        }
        self.nbd_server = None;
        Ok(ids)
    }

    /// The ids of the exports, in order.
    pub fn export_ids(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }

    /// `query-named-block-nodes`, in QSD's shape.
    pub fn query_named_block_nodes(&self) -> Value {
        Value::Array(self.nodes.values().map(NamedNode::info).collect())
    }

    /// `x-debug-query-block-graph`, in QSD's shape: the named nodes and what hangs off them (a
    /// mirror's filter), one anonymous block backend per export with its `root` edge, and each
    /// job with its `main node` (the filter), `source` and `target` edges. ringblk has no
    /// permission system; an edge's `perm` and `shared-perm` are what QSD reports for the same
    /// edge, so tools that read them see the same graph.
    pub fn block_graph(&self) -> Value {
        let mut graph = BlockGraph::default();
        for named in self.nodes.values() {
            graph.node(&named.node);
        }
        for entry in self.exports.values() {
            let backend = graph.vertex("", "block-backend");
            let root = graph.node(&entry.root());
            let perm: &[&str] = if entry.writable {
                &["write", "consistent-read"]
            } else {
                &["consistent-read"]
            };
            let shared = ["resize", "write-unchanged", "write", "consistent-read"];
            graph.edge("root", backend, root, perm, &shared);
        }
        for job in self.jobs.values() {
            let id = graph.vertex(job.id(), "block-job");
            let shared = ["write-unchanged", "write", "consistent-read"];
            let source = graph.node(job.source());
            let filter = graph.parent_of(source);
            if let Some(filter) = filter {
                graph.edge("main node", id, filter, &["consistent-read"], &shared);
            }
            graph.edge("source", id, source, &[], &shared);
            let target = graph.node(job.target());
            let shared = ["resize", "write-unchanged", "write", "consistent-read"];
            graph.edge("target", id, target, &[], &shared);
        }
        json!({ "nodes": graph.vertices, "edges": graph.edges })
    }

    /// The node export `id` serves now (it changes at a mirror's pivot).
    pub fn export_node(&self, id: &str) -> Option<String> {
        self.exports.get(id).map(|e| e.root().name().to_owned())
    }

    /// `query-block-exports`.
    pub fn query_block_exports(&self) -> Value {
        let exports: Vec<Value> = self
            .exports
            .iter()
            .map(|(id, e)| {
                json!({
                    "id": id,
                    "type": e.type_name(),
                    "node-name": e.root().name(),
                    "shutting-down": false,
                })
            })
            .collect();
        Value::Array(exports)
    }

    /// Clean shutdown: running jobs are cancelled (force: the devices stay on their source) and
    /// waited for, every export stops (its queues after their in-flight requests), every node is
    /// flushed, then the iothreads stop.
    pub fn shutdown(mut self) {
        let ctx = Context::current();
        let ended = |job: &Mirror| matches!(job.status(), JobStatus::Concluded | JobStatus::Null);
        for job in self.jobs.values().filter(|job| !ended(job)) {
            let _ = job.cancel(true);
        }
        ctx.run_until(|| self.jobs.values().all(ended));
        self.jobs.clear();
        let ids: Vec<String> = self.exports.keys().cloned().collect();
        for id in ids {
            let _ = self.del_export(&id);
        }
        for node in self.nodes.values().map(|n| &n.node) {
            let done = std::rc::Rc::new(std::cell::Cell::new(false));
            let d = done.clone();
            node.submit(Request::Flush, Box::new(move |_, _| d.set(true)));
            ctx.run_until(|| done.get());
        }
        self.nbd_server = None;
        self.nodes.clear();
        self.iothreads.clear();
    }
}
