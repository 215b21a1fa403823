//! The command lines that attach a controller to a VM, logged for every
//! controller created so an operator can copy them.
//!
//! vhost-user needs the guest's RAM in shared memory (the backend maps it):
//! QEMU needs a `share=on` memory backend bound to the guest's NUMA node,
//! cloud-hypervisor `--memory shared=on`.

use std::path::Path;

use crate::vhost::ControllerInfo;

/// Guest memory size used in the examples.
const MEM: &str = "1G";

/// Quotes a path for a POSIX shell when it needs it.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@%=,".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A QEMU (>= 9.2, `reconnect-ms`) command line that attaches the controller
/// whose socket is `socket`; add a boot disk and kernel of your own.
pub fn qemu_command(socket: &Path, num_queues: u16) -> String {
    let sock = shell_quote(&socket.display().to_string());
    format!(
        "qemu-system-x86_64 -machine q35,accel=kvm:tcg -cpu max -smp 2 -m {MEM} \
         -object memory-backend-memfd,id=mem,size={MEM},share=on -numa node,memdev=mem \
         -chardev socket,id=char0,path={sock},reconnect-ms=1000 \
         -device vhost-user-blk-pci,chardev=char0,num-queues={num_queues} ..."
    )
}

/// A cloud-hypervisor command line that attaches the controller.
pub fn cloud_hypervisor_command(socket: &Path, num_queues: u16) -> String {
    let sock = shell_quote(&socket.display().to_string());
    format!(
        "cloud-hypervisor --cpus boot=2 --memory size={MEM},shared=on \
         --disk vhost_user=true,socket={sock},num_queues={num_queues},queue_size=128 ..."
    )
}

/// Logs how to attach a newly created controller.
pub fn log(info: &ControllerInfo) {
    let sock = Path::new(&info.socket);
    tracing::info!(
        ctrlr = %info.ctrlr,
        "attach with QEMU: {}  (QEMU before 9.2: reconnect=1 instead of reconnect-ms=1000)",
        qemu_command(sock, info.max_queues)
    );
    tracing::info!(
        ctrlr = %info.ctrlr,
        "attach with cloud-hypervisor: {}",
        cloud_hypervisor_command(sock, info.max_queues)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_line_shares_memory_and_names_the_socket() {
        let q = qemu_command(Path::new("/var/tmp/vhost.0"), 4);
        assert!(q.contains("share=on"));
        assert!(q.contains("-numa node,memdev=mem"));
        assert!(q.contains("path=/var/tmp/vhost.0,reconnect-ms=1000"));
        assert!(q.contains("vhost-user-blk-pci,chardev=char0,num-queues=4"));
        let c = cloud_hypervisor_command(Path::new("/var/tmp/vhost.0"), 2);
        assert!(c.contains("--memory size=1G,shared=on"));
        assert!(c.contains("vhost_user=true,socket=/var/tmp/vhost.0,num_queues=2"));
    }

    #[test]
    fn odd_paths_are_quoted() {
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("/a'b"), r"'/a'\''b'");
        assert_eq!(shell_quote("/var/tmp/vhost.0"), "/var/tmp/vhost.0");
    }
}
