//! The vhost-user-blk frontend handshake, through the rust-vmm `vhost` crate.
//!
//! Order of messages: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
//! SET_OWNER, GET_CONFIG, SET_FEATURES ([`Connection::connect`]); then SET_MEM_TABLE and, per
//! queue, SET_VRING_NUM/ADDR/BASE/KICK/CALL and SET_VRING_ENABLE ([`Connection::start`]);
//! GET_VRING_BASE per started queue when the connection is dropped (stops the rings).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::Error;
use crate::virtq::{GUEST_PHYS_BASE, QueueLayout, SharedMemory, SplitQueue};

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Bytes of `struct virtio_blk_config` read with GET_CONFIG (up to and including `num_queues`
/// and the discard fields: the classic 60-byte layout every backend serves).
const CONFIG_LEN: u32 = 60;

/// What the device told us in the handshake.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    /// Capacity in bytes (config `capacity` * 512).
    pub capacity_bytes: u64,
    /// Logical block size (config `blk_size`, 512 if not offered).
    pub blk_size: u32,
    /// Request queues the device serves.
    pub num_queues: u16,
    /// VIRTIO_BLK_F_RO was offered.
    pub read_only: bool,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// Virtio features acknowledged.
    pub features: u64,
    /// vhost-user protocol features acknowledged.
    pub protocol_features: u64,
}

/// One started queue, ready for a generator thread.
pub(crate) struct QueueHandle {
    pub(crate) queue: SplitQueue,
    pub(crate) kick: EventFd,
    pub(crate) call: EventFd,
}

impl QueueHandle {
    /// The call eventfd, borrowed for poll(2).
    pub(crate) fn call_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by `self.call`, which outlives the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.call.as_raw_fd()) }
    }
}

/// An open vhost-user connection to a vhost-user-blk device.
pub(crate) struct Connection {
    frontend: Frontend,
    info: DeviceInfo,
    started: usize,
}

/// Longest wait for a vhost-user reply.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects, retrying for a moment while the daemon is not listening yet.
fn connect_stream(socket: &Path) -> Result<UnixStream, Error> {
    let mut attempts = 0;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && attempts < 10 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(Error::Io {
                    context: "connecting to the vhost-user socket",
                    source,
                });
            }
        }
    }
}

fn vhost_err(step: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Vhost { step, source }
}

fn bit(n: u32) -> u64 {
    1u64 << n
}

impl Connection {
    /// Connects and negotiates features; reads the device configuration.
    pub(crate) fn connect(socket: &Path) -> Result<Connection, Error> {
        let stream = connect_stream(socket)?;
        // A daemon that stops answering fails the handshake instead of hanging it.
        stream
            .set_read_timeout(Some(MESSAGE_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(MESSAGE_TIMEOUT)))
            .map_err(|source| Error::Io {
                context: "socket timeouts",
                source,
            })?;
        let mut fe = Frontend::from_stream(stream, 1);
        let offered = fe.get_features().map_err(vhost_err("GET_FEATURES"))?;
        let required = bit(VIRTIO_F_VERSION_1) | F_PROTOCOL_FEATURES;
        if offered & required != required {
            return Err(Error::DeviceProtocol(format!(
                "device features {offered:#x} lack VERSION_1 or PROTOCOL_FEATURES"
            )));
        }
        let optional = bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_MQ)
            | bit(VIRTIO_BLK_F_RO)
            | bit(VIRTIO_BLK_F_FLUSH);
        let features = required | (offered & optional);

        let proto_offered = fe
            .get_protocol_features()
            .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
        let proto = proto_offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK);
        if !proto.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(Error::DeviceProtocol(
                "device does not offer the CONFIG protocol feature".to_string(),
            ));
        }
        fe.set_protocol_features(proto)
            .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later message is acknowledged, so a refused one fails here, not silently.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let max_vrings = if proto.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(vhost_err("GET_QUEUE_NUM"))?
        } else {
            1
        };
        fe.set_owner().map_err(vhost_err("SET_OWNER"))?;

        let (_, cfg) = fe
            .get_config(
                0,
                CONFIG_LEN,
                VhostUserConfigFlags::empty(),
                &[0u8; CONFIG_LEN as usize],
            )
            .map_err(vhost_err("GET_CONFIG"))?;
        let u64_at = |o: usize| u64::from_le_bytes(cfg[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(cfg[o..o + 2].try_into().expect("2 bytes"));
        let capacity_bytes = u64_at(0).checked_mul(512).ok_or_else(|| {
            Error::DeviceProtocol(format!("capacity {} sectors overflows", u64_at(0)))
        })?;
        let blk_size = if features & bit(VIRTIO_BLK_F_BLK_SIZE) != 0 {
            u32_at(20)
        } else {
            512
        };
        if blk_size < 512 || !blk_size.is_power_of_two() {
            return Err(Error::DeviceProtocol(format!("blk_size {blk_size}")));
        }
        let cfg_queues = if features & bit(VIRTIO_BLK_F_MQ) != 0 {
            u16_at(34)
        } else {
            1
        };
        let num_queues = u64::from(cfg_queues).min(max_vrings);
        let num_queues = u16::try_from(num_queues).unwrap_or(u16::MAX);
        if num_queues == 0 {
            return Err(Error::DeviceProtocol("device has no queues".to_string()));
        }

        fe.set_features(features)
            .map_err(vhost_err("SET_FEATURES"))?;
        Ok(Connection {
            frontend: fe,
            info: DeviceInfo {
                capacity_bytes,
                blk_size,
                num_queues,
                read_only: features & bit(VIRTIO_BLK_F_RO) != 0,
                event_idx: features & bit(VIRTIO_RING_F_EVENT_IDX) != 0,
                features,
                protocol_features: proto.bits(),
            },
            started: 0,
        })
    }

    pub(crate) fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Shares `mem` with the device and starts one queue per layout (queue i = layout i).
    pub(crate) fn start(
        &mut self,
        mem: &Arc<SharedMemory>,
        layouts: &[QueueLayout],
    ) -> Result<Vec<QueueHandle>, Error> {
        assert!(self.started == 0, "queues already started");
        if layouts.len() > usize::from(self.info.num_queues) {
            return Err(Error::Job(format!(
                "{} job threads need as many queues; the device has {}",
                layouts.len(),
                self.info.num_queues
            )));
        }
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: GUEST_PHYS_BASE,
            memory_size: mem.len() as u64,
            userspace_addr: mem.user_addr(),
            mmap_offset: 0,
            mmap_handle: mem.fd(),
        };
        self.frontend
            .set_mem_table(&[region])
            .map_err(vhost_err("SET_MEM_TABLE"))?;
        let mut handles = Vec::with_capacity(layouts.len());
        for (index, layout) in layouts.iter().enumerate() {
            let queue = SplitQueue::new(Arc::clone(mem), *layout, self.info.event_idx);
            let new_fd = || {
                EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(|source| Error::Io {
                    context: "eventfd",
                    source,
                })
            };
            let kick = new_fd()?;
            let call = new_fd()?;
            let addrs = queue.ring_addrs();
            let fe = &mut self.frontend;
            fe.set_vring_num(index, queue.size())
                .map_err(vhost_err("SET_VRING_NUM"))?;
            let config = VringConfigData {
                queue_max_size: queue.size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: addrs.desc,
                used_ring_addr: addrs.used,
                avail_ring_addr: addrs.avail,
                log_addr: None,
            };
            fe.set_vring_addr(index, &config)
                .map_err(vhost_err("SET_VRING_ADDR"))?;
            fe.set_vring_base(index, 0)
                .map_err(vhost_err("SET_VRING_BASE"))?;
            fe.set_vring_kick(index, &kick)
                .map_err(vhost_err("SET_VRING_KICK"))?;
            fe.set_vring_call(index, &call)
                .map_err(vhost_err("SET_VRING_CALL"))?;
            fe.set_vring_enable(index, true)
                .map_err(vhost_err("SET_VRING_ENABLE"))?;
            self.started = index + 1;
            handles.push(QueueHandle { queue, kick, call });
        }
        Ok(handles)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Stop the rings the way a VMM does before it lets go of guest memory; errors do not
        // matter here (the device may already be gone), closing the socket ends the session.
        for index in 0..self.started {
            let _ = self.frontend.get_vring_base(index);
        }
    }
}
