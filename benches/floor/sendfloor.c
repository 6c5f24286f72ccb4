/* The kernel's share of a delivery, without any relay: one process writes a
 * 150-byte message to each of N loopback TCP connections every 10 ms (N writes per
 * tick, like a node fanning out a 100 msgs/s channel to N subscribers), another
 * process reads them all with epoll. Prints the writer's CPU time per write.
 *
 *   cc -O2 -o /tmp/sendfloor benches/floor/sendfloor.c
 *   taskset -c 0 /tmp/sendfloor write 29123 1000 10 & sleep 0.2
 *   taskset -c 1 /tmp/sendfloor read 29123 1000
 */
#include <arpa/inet.h>
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

static double cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: sendfloor read|write PORT N [SECONDS]\n"); return 2; }
    int port = atoi(argv[2]), n = atoi(argv[3]);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int one = 1;
    if (!strcmp(argv[1], "read")) {
        int ep = epoll_create1(0);
        for (int i = 0; i < n; i++) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) { perror("connect"); return 1; }
            struct epoll_event ev = {.events = EPOLLIN, .data.fd = s};
            epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
        }
        struct epoll_event evs[256];
        char buf[4096];
        for (;;) {
            int k = epoll_wait(ep, evs, 256, -1);
            for (int i = 0; i < k; i++)
                if (read(evs[i].data.fd, buf, sizeof buf) <= 0) return 0;
        }
    }
    int seconds = argc > 4 ? atoi(argv[4]) : 10;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    bind(l, (struct sockaddr *)&addr, sizeof addr);
    listen(l, 4096);
    int *fds = malloc(n * sizeof(int));
    for (int i = 0; i < n; i++) {
        fds[i] = accept(l, NULL, NULL);
        setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    char msg[150];
    memset(msg, 'x', sizeof msg);
    double start = cpu_seconds();
    long writes = 0;
    for (int tick = 0; tick < seconds * 100; tick++) {
        for (int i = 0; i < n; i++) writes += write(fds[i], msg, sizeof msg) > 0;
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    double cpu = cpu_seconds() - start;
    printf("%ld writes, %.2f CPU-s = %.2f CPU-s per million writes\n", writes, cpu, cpu / (writes / 1e6));
    return 0;
}
