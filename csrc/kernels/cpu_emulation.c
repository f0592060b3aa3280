// Makes a process see a CPU without AVX-512, AVX-VNNI or AMX, so that `vivace bench
// kernels --emulate-cpu avx2` measures every runtime (ours, onnxruntime's MLAS, torch's
// fbgemm, numpy) on the code paths it takes on an AVX2-only machine, in the same run.
//
// Loaded with LD_PRELOAD and VIVACE_EMULATE_CPU=avx2. Its constructor asks the kernel to
// trap CPUID (arch_prctl ARCH_SET_CPUID, Linux >= 4.12 on a CPU or hypervisor with CPUID
// faulting); each CPUID then raises SIGSEGV, which the handler answers with the real result
// minus the hidden feature bits. The setting is inherited by threads and forks, and
// LD_PRELOAD by child processes. Libraries initialised before the constructor (libc, libm,
// the interpreter's own) keep the real CPU: glibc's string functions stay AVX-512 ones; the
// runtimes measured are loaded later, and see the masked CPUID.
//
// The handler must stay SIGSEGV's handler for the life of the process, yet programs install
// their own (Python's faulthandler, pytest's): sigaction() and signal() are interposed for
// SIGSEGV, so the program's handler is recorded and reported back as installed, and every
// SIGSEGV that is not a trapped CPUID goes to it (or, for SIG_DFL/SIG_IGN, kills the process
// as it would have).
//
// Without VIVACE_EMULATE_CPU the library does nothing but forward those calls; where it
// cannot trap CPUID it stops the process rather than let a benchmark run unmasked under a
// masked label. Built for x86-64 Linux only (kernels.cmake).
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

// CPUID leaf 7 bits above AVX2: the AVX-512 family, AVX-VNNI and its relatives, AMX, AVX10.
static const uint32_t kLeaf7Ebx =
    (1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31);
static const uint32_t kLeaf7Ecx = (1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14);
static const uint32_t kLeaf7Edx = (1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25);
static const uint32_t kLeaf7Sub1Eax = (1u << 4) | (1u << 5) | (1u << 21) | (1u << 23);
static const uint32_t kLeaf7Sub1Edx = (1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19);

typedef int (*SigactionFn)(int, const struct sigaction*, struct sigaction*);

static volatile sig_atomic_t emulating;
static struct sigaction program_action;  // the program's SIGSEGV action while emulating (SIG_DFL at first)

static SigactionFn RealSigaction(void) {
  static SigactionFn real;
  if (real == NULL) {
    void* symbol = dlsym(RTLD_NEXT, "sigaction");
    memcpy(&real, &symbol, sizeof real);  // POSIX's object-to-function pointer conversion
  }
  return real;
}

static long SetCpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static int IsTrappedCpuid(const siginfo_t* info, const greg_t* regs) {
  if (info->si_code != SI_KERNEL) return 0;  // sent by a process, or a page fault: not a trap
  const unsigned char* ip = (const unsigned char*)regs[REG_RIP];
  return ip[0] == 0x0f && ip[1] == 0xa2;
}

// A SIGSEGV that is not ours, under the action the program asked for.
static void PassOn(int signal_number, siginfo_t* info, void* context) {
  const struct sigaction action = program_action;
  if (action.sa_flags & SA_SIGINFO) {
    action.sa_sigaction(signal_number, info, context);
  } else if (action.sa_handler != SIG_DFL && action.sa_handler != SIG_IGN) {
    action.sa_handler(signal_number);
  } else {
    // Default action (an ignored fault kills too): a fault recurs on return, a sent signal
    // is raised again, both now under SIG_DFL.
    struct sigaction default_action;
    memset(&default_action, 0, sizeof default_action);
    default_action.sa_handler = SIG_DFL;
    RealSigaction()(signal_number, &default_action, NULL);
    if (info->si_code <= 0) raise(signal_number);
  }
}

static void AnswerCpuid(int signal_number, siginfo_t* info, void* context) {
  greg_t* regs = ((ucontext_t*)context)->uc_mcontext.gregs;
  if (!IsTrappedCpuid(info, regs)) {
    PassOn(signal_number, info, context);
    return;
  }
  const int saved_errno = errno;
  const unsigned leaf = (unsigned)regs[REG_RAX], subleaf = (unsigned)regs[REG_RCX];
  unsigned eax, ebx, ecx, edx;
  SetCpuid(1);  // per thread: only this one sees the real CPUID, for one instruction
  __cpuid_count(leaf, subleaf, eax, ebx, ecx, edx);
  SetCpuid(0);
  if (leaf == 7 && subleaf == 0) {
    ebx &= ~kLeaf7Ebx;
    ecx &= ~kLeaf7Ecx;
    edx &= ~kLeaf7Edx;
  } else if (leaf == 7 && subleaf == 1) {
    eax &= ~kLeaf7Sub1Eax;
    edx &= ~kLeaf7Sub1Edx;
  }
  regs[REG_RAX] = eax;
  regs[REG_RBX] = ebx;
  regs[REG_RCX] = ecx;
  regs[REG_RDX] = edx;
  regs[REG_RIP] += 2;  // past the 2-byte CPUID instruction
  errno = saved_errno;
}

// Interposed: while emulating, SIGSEGV's action is recorded, not installed.
int sigaction(int signal_number, const struct sigaction* action, struct sigaction* old_action) {
  if (signal_number != SIGSEGV || !emulating) return RealSigaction()(signal_number, action, old_action);
  if (old_action != NULL) *old_action = program_action;
  if (action != NULL) program_action = *action;
  return 0;
}

sighandler_t signal(int signal_number, sighandler_t handler) {
  struct sigaction action, old_action;
  memset(&action, 0, sizeof action);
  action.sa_handler = handler;
  action.sa_flags = SA_RESTART;  // glibc's signal(): BSD semantics
  sigemptyset(&action.sa_mask);
  if (signal_number > 0 && signal_number < NSIG) sigaddset(&action.sa_mask, signal_number);
  if (sigaction(signal_number, &action, &old_action) != 0) return SIG_ERR;
  return old_action.sa_handler;
}

static void Fail(const char* what) {
  fprintf(stderr, "vivace CPU emulation (VIVACE_EMULATE_CPU=%s): %s\n", getenv("VIVACE_EMULATE_CPU"), what);
  _exit(2);
}

__attribute__((constructor)) static void HideCpuFeatures(void) {
  const char* target = getenv("VIVACE_EMULATE_CPU");
  if (target == NULL || target[0] == '\0') return;
  if (strcmp(target, "avx2") != 0) Fail("unknown target (expected avx2)");
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = AnswerCpuid;
  action.sa_flags = SA_SIGINFO | SA_NODEFER;  // NODEFER: a program handler's own fault kills
  sigemptyset(&action.sa_mask);
  if (RealSigaction()(SIGSEGV, &action, &program_action) != 0) Fail(strerror(errno));
  emulating = 1;
  if (SetCpuid(0) != 0)
    Fail("this CPU, hypervisor or kernel cannot trap the CPUID instruction (needs CPUID faulting, "
         "'cpuid_fault' in /proc/cpuinfo, and Linux >= 4.12)");
}
