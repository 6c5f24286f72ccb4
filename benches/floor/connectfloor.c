/* The kernel's share of a WebSocket connect, without any relay or WebSocket
 * library: a client opens N loopback TCP connections (at most C in flight), sends
 * an upgrade request on each and waits for a 101 response followed by a welcome
 * frame; a server accepts, reads the request and answers with one write. Each side
 * prints its own CPU time per connection; the client also prints the wall time.
 *
 * The client also works against a real node (it sends a valid upgrade request and
 * needs only the first bytes of the answer), which measures the node's connect cost
 * without a load generator that is itself the limit.
 *
 *   cc -O2 -o /tmp/connectfloor benches/floor/connectfloor.c
 *   taskset -c 0 /tmp/connectfloor serve 29124 10000 & sleep 0.2
 *   taskset -c 1 /tmp/connectfloor connect 29124 10000 256
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char REQUEST[] =
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
static const char RESPONSE[] =
    "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
    "sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\ndate: Tue, 24 Nov 2026 00:00:00 GMT\r\n\r\n"
    "\x81\x3e{\"op\":\"welcome\",\"v\":1,\"node\":\"floor\",\"conn\":\"1\",\"channels\":[]}";

static double cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

static double wall_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void raise_nofile(void) {
    struct rlimit l;
    if (getrlimit(RLIMIT_NOFILE, &l) == 0) { l.rlim_cur = l.rlim_max; setrlimit(RLIMIT_NOFILE, &l); }
}

static int serve(struct sockaddr_in *addr, int n) {
    int one = 1, l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)addr, sizeof *addr) || listen(l, 4096)) { perror("listen"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = l};
    epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
    struct epoll_event evs[256];
    char buf[4096];
    int answered = 0;
    double start = -1;
    while (answered < n) {
        int k = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                int s;
                while ((s = accept4(l, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (start < 0) start = cpu_seconds();
                    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLET, .data.fd = s};
                    epoll_ctl(ep, EPOLL_CTL_ADD, s, &cev);
                }
            } else if (read(fd, buf, sizeof buf) > 0) {
                answered += write(fd, RESPONSE, sizeof RESPONSE - 1) > 0;
            }
        }
    }
    double cpu = cpu_seconds() - start;
    printf("serve: %d connections, %.3f CPU-s = %.1f us per connection\n", n, cpu, cpu / n * 1e6);
    fflush(stdout);
    pause(); /* keep the connections open until killed */
    return 0;
}

static int open_one(struct sockaddr_in *addr, int ep) {
    int one = 1, s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s < 0) { perror("socket"); exit(1); }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(s, (struct sockaddr *)addr, sizeof *addr) != 0 && errno != EINPROGRESS) { perror("connect"); exit(1); }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLET, .data.u64 = (unsigned)s};
    epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    return s;
}

static int client(struct sockaddr_in *addr, int n, int concurrency) {
    int ep = epoll_create1(0);
    /* Per socket: 0 = connecting, 1 = request sent, 2 = answered. */
    char *state = calloc(1 << 20, 1);
    int opened = 0, done = 0, in_flight = 0;
    double cpu0 = cpu_seconds(), wall0 = wall_seconds();
    struct epoll_event evs[256];
    char buf[4096];
    while (done < n) {
        while (in_flight < concurrency && opened < n) { open_one(addr, ep); opened++; in_flight++; }
        int k = epoll_wait(ep, evs, 256, 10000);
        if (k == 0) { fprintf(stderr, "timed out with %d of %d answered\n", done, n); return 1; }
        for (int i = 0; i < k; i++) {
            int s = (int)evs[i].data.u64;
            if (state[s] == 0 && (evs[i].events & EPOLLOUT)) {
                if (write(s, REQUEST, sizeof REQUEST - 1) <= 0) { perror("write"); return 1; }
                state[s] = 1;
            }
            if (state[s] == 1 && (evs[i].events & EPOLLIN)) {
                /* The 101 and the welcome frame may come in one read or in two. */
                ssize_t r;
                while ((r = read(s, buf, sizeof buf)) > 0) {
                    if (memmem(buf, r, "welcome", 7)) { state[s] = 2; done++; in_flight--; break; }
                }
                if (r == 0) { fprintf(stderr, "connection closed before welcome\n"); return 1; }
            }
        }
    }
    double cpu = cpu_seconds() - cpu0, wall = wall_seconds() - wall0;
    printf("connect: %d connections in %.3f s, %.3f CPU-s = %.1f us per connection\n", n, wall, cpu,
           cpu / n * 1e6);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: connectfloor serve|connect PORT N [CONCURRENCY]\n"); return 2; }
    raise_nofile();
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int n = atoi(argv[3]);
    if (!strcmp(argv[1], "serve")) return serve(&addr, n);
    return client(&addr, n, argc > 4 ? atoi(argv[4]) : 256);
}
